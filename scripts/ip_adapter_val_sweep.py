"""The IP-Adapter variation measure on the world's VALIDATION references at several sampler settings
(docs/ip_adapter.md). Adapters and settings are chosen here, never on the test split ``kandinsky3 eval ip-adapter``
reports. Each argument after the reference count is one setting: comma-separated ``name=value`` pairs of the
generation settings (``guidance``, ``image_weight``…); an empty string is the defaults (the eval's); ``text`` is
the ceiling: plain nano (no adapter) given each reference's full caption (colour, shape, size, position).

    python scripts/ip_adapter_val_sweep.py runs/nano-ip-adapter-v16/export 200 "" guidance=2 image_weight=1.3 text
    python scripts/ip_adapter_val_sweep.py --model nano-flash nano-ip-adapter 400 "" early_boost=1

``--model NAME`` (first): another model than nano (the adapter is still the one given).
"""

import random
import sys
import time

from kandinsky3 import Kandinsky3
from kandinsky3.eval.ip_adapter import object_verdicts, references
from kandinsky3.world.captions import describe_object


def full_caption(obj) -> str:
    return describe_object(obj, random.Random(0), p_size=1.0, p_position=1.0, p_color=1.0)


def main():
    args, model = sys.argv[1:], "nano"
    if args[:1] == ["--model"] and len(args) > 1:
        model, args = args[1], args[2:]
    if len(args) < 2:
        sys.exit(__doc__)
    adapter, num = args[0], int(args[1])
    pipe = Kandinsky3.from_pretrained(model)
    pipe.get_ip_adapter(adapter)
    refs = references(num, split="val")
    for spec in args[2:] or [""]:
        settings = {} if spec == "text" else {k: float(v) for k, v in (p.split("=") for p in spec.split(",") if p)}
        start_time, kept, placed = time.time(), 0, 0
        for start in range(0, num, 25):
            chunk = refs[start : start + 25]
            seeds = list(range(start, start + len(chunk)))
            if spec == "text":
                captions = [full_caption(r.scene.objects[0]) for r in chunk]
                outs = pipe.generate(captions, seed=seeds, progress=False)
            else:
                outs = pipe.variation([r.image for r in chunk], seed=seeds, progress=False, **settings)
            for ref, out in zip(chunk, outs):
                k, p = object_verdicts(out, ref.scene.objects[0])
                kept, placed = kept + k, placed + p
        took = time.time() - start_time
        print(f"{spec or 'defaults':<24} colour + shape {kept / num:.1%}, position {placed / num:.1%} ({took:.0f} s)")


if __name__ == "__main__":
    main()
