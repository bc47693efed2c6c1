"""The ControlNet layout measure on the world's VALIDATION scenes at several sampler settings (docs/controlnet.md).

Settings are chosen here, never on the test split ``kandinsky3 eval controlnet`` reports. Each argument after the
scene count is one setting: comma-separated ``name=value`` pairs of the generation settings (``guidance``,
``threshold_percentile``, ``eta``…) plus ``scale`` (the conditioning scale); an empty string is the defaults.

    python scripts/controlnet_val_sweep.py runs/nano-controlnet-one/export 150 "" threshold_percentile=0.98 guidance=0
"""

import functools
import sys

from kandinsky3 import Kandinsky3
from kandinsky3.eval import controlnet as ev


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    controlnet, num = sys.argv[1], int(sys.argv[2])
    ev.control_cases = functools.partial(ev.control_cases, split="val")
    pipe = Kandinsky3.from_pretrained("nano", controlnet=controlnet)
    control = pipe.control
    for spec in sys.argv[3:] or [""]:
        settings = {k: float(v) for k, v in (pair.split("=") for pair in spec.split(",") if pair)}
        scale = settings.pop("scale", 1.0)
        pipe.control = functools.partial(control, **settings)
        tally = ev.evaluate_control(pipe, num, steps=25, scale=scale, baseline=False, progress=False, rows=("layout",))
        rates = tally["layout"]["controlnet"].to_dict()
        by_count = " / ".join(f"{v:.1%}" for v in rates["positions_by_count"].values())
        n, layout = rates["n"], rates["positions"]
        twins = f"twins {rates['positions_twins']:.1%} of {rates['n_twins']}, others {rates['positions_distinct']:.1%}"
        fair = f"hint-fair {rates['hint_fair']:.1%}"
        print(f"{spec or 'defaults':<32} layout {layout:.1%}, {fair} (1 / 2 / 3 objects: {by_count}; {twins}), n={n}")


if __name__ == "__main__":
    main()
