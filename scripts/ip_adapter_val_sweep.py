"""The IP-Adapter variation measure on the world's VALIDATION references at several sampler settings
(docs/ip_adapter.md). Adapters and settings are chosen here, never on the test split ``kandinsky3 eval ip-adapter``
reports. Each argument after the reference count is one setting: comma-separated ``name=value`` pairs of the
generation settings (``guidance``, ``image_weight``…); an empty string is the defaults (the eval's).

    python scripts/ip_adapter_val_sweep.py runs/nano-ip-adapter-v16/export 200 "" guidance=2 image_weight=1.3
"""

import sys
import time

from kandinsky3 import Kandinsky3
from kandinsky3.eval.ip_adapter import object_verdicts, references


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    adapter, num = sys.argv[1], int(sys.argv[2])
    pipe = Kandinsky3.from_pretrained("nano")
    pipe.get_ip_adapter(adapter)
    refs = references(num, split="val")
    for spec in sys.argv[3:] or [""]:
        settings = {k: float(v) for k, v in (pair.split("=") for pair in spec.split(",") if pair)}
        start_time, kept, placed = time.time(), 0, 0
        for start in range(0, num, 25):
            chunk = refs[start : start + 25]
            seeds = list(range(start, start + len(chunk)))
            outs = pipe.variation([r.image for r in chunk], seed=seeds, progress=False, **settings)
            for ref, out in zip(chunk, outs):
                k, p = object_verdicts(out, ref.scene.objects[0])
                kept, placed = kept + k, placed + p
        took = time.time() - start_time
        print(f"{spec or 'defaults':<24} colour + shape {kept / num:.1%}, position {placed / num:.1%} ({took:.0f} s)")


if __name__ == "__main__":
    main()
