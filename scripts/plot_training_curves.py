"""Training curves of one or more runs from their ``log.jsonl`` files (docs/flash.md's plot).

    python scripts/plot_training_curves.py --out docs/flash_curves.png \
        seed=runs/nano-flash distill=runs/nano-flash-distill "D lr 1e-5=runs/nano-flash-d-lr"

One panel per logged quantity that any run has: every loss, every ``metrics`` entry (e.g. the gradient penalty),
and every ``probe`` entry (e.g. judge-read alignment of periodic samples). Needs matplotlib (``pip install
matplotlib``; it is not a dependency of the package).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def read_curves(log: Path) -> dict[str, list[tuple[int, float]]]:
    """{quantity: [(step, value)]} from a run's log.jsonl: losses by name, ``metrics.X`` and ``probe.X``."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        step = entry["step"]
        for key, value in entry.items():
            if key in ("step", "lr"):
                continue
            if isinstance(value, dict):
                for name, v in value.items():
                    curves[f"{key}.{name}"].append((step, float(v)))
            else:
                curves[key].append((step, float(value)))
    return dict(curves)


def plot(runs: dict[str, Path], out: Path, title: str | None = None) -> list[str]:
    """Draw every quantity of ``runs`` (label → run folder or log file) into ``out``; returns the panel names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: read_curves(path / "log.jsonl" if path.is_dir() else path) for label, path in runs.items()}
    names = sorted({name for run in curves.values() for name in run}, key=lambda n: (n.count("."), n))
    if not names:
        raise SystemExit("no logged quantities in " + ", ".join(str(p) for p in runs.values()))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, run in curves.items():
            if name in run:
                steps, values = zip(*run[name])
                ax.plot(steps, values, marker="." if len(steps) < 20 else None, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (or LABEL=path/to/log.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: give runs as LABEL=RUN_DIR")
        if not Path(path).exists():
            parser.error(f"{path}: no such run folder or log file")
        runs[label] = Path(path)
    names = plot(runs, args.out, args.title)
    print(f"wrote {args.out}: {', '.join(names)}")


if __name__ == "__main__":
    main()
