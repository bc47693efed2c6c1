"""The inpainting eval on the world's VALIDATION scenes, for choosing models and settings (docs/inpainting.md).

Choices are made here, never on the test split ``kandinsky3 eval inpainting`` reports. Arguments: the scene count,
then one or more model folders (or registered names); ``--guidance G`` (repeatable) samples each at several
guidance scales (default: the model's own).

    python scripts/inpainting_val_sweep.py 150 runs/nano-inpainting-drift-6/export wip/nano-inpainting-random-one
"""

import argparse

from kandinsky3 import Kandinsky3
from kandinsky3.eval import inpainting as ev


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num", type=int, help="validation scenes")
    parser.add_argument("models", nargs="+", help="model folders or registered names")
    parser.add_argument("--guidance", type=float, action="append", help="guidance scale (repeatable)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (the eval's 25)")
    args = parser.parse_args()
    cases = ev.make_cases(args.num, split="val")
    reports = []
    for model in args.models:
        pipe = Kandinsky3.from_pretrained(model)
        for guidance in args.guidance or [None]:
            name = model if guidance is None else f"{model} g{guidance:g}"
            report, _, _ = ev.evaluate_inpainting(pipe, cases, args.steps, guidance, name, progress=False)
            reports.append(report)
            print(ev.format_table([report], seed_rows=False).splitlines()[1], flush=True)
    print(ev.format_table(reports, seed_rows=False))


if __name__ == "__main__":
    main()
