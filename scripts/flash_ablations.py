"""The ablation table of docs/flash.md: judge-read alignment of Flash students (and their teacher) at 4 and 2 Flash
steps, no guidance, on the same validation captions and seeds for every row.

    python scripts/flash_ablations.py --num 200 --json runs/flash_ablations.json \\
        "teacher (nano), no training=nano" "seed recipe=runs/nano-flash/export" "D lr 1e-5=runs/nano-flash-d-lr/export"

Each row is ``label=model`` (a registered name or an exported folder); the teacher is sampled with the Flash sampler
too. ``--num`` captions are 40 % one object, 40 % two, 20 % three (``alignment_captions``); the table reports the
one- and two-object groups, as the eval of issue #16 does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GROUPS = ("1 object", "2 objects")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="label=model (a name or a folder)")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--json", type=Path, default=None, help="write the rates here")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    from kandinsky3 import Kandinsky3
    from kandinsky3.eval.alignment import evaluate_alignment

    results = {}
    for row in args.rows:
        label, _, model = row.partition("=")
        if not model:
            ap.error(f"{row!r}: give label=model")
        pipe = Kandinsky3.from_pretrained(model, device=args.device)
        results[label] = {"model": model}
        for steps in args.steps:
            report = evaluate_alignment(pipe, args.num, 0.0, steps, held_out=0, progress=False, sampler="flash")
            results[label][f"{steps} steps"] = {g: round(report.rate(g), 4) for g in GROUPS}
        cells = " | ".join(
            " / ".join(f"{100 * results[label][f'{s} steps'][g]:.1f}" for g in GROUPS) + " %" for s in args.steps
        )
        print(f"| {label} | {cells} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
