"""Where an inpainting model loses the picture outside the hole (docs/inpainting.md, "Where the 30 dB go").

On N scenes of the world's validation split (never the test split the eval reports), one object's box repainted from
its own caption as in ``kandinsky3 eval inpainting``, this prints, for each model:
- the PSNR outside the mask of the raw output (the eval's measure);
- the same after the final latent's known cells (the keep-mask at latent size) are swapped for the input's own latent,
  and the MoVQ round trip of the input: what is left once the model's latent is exact there;
- the final latent against the input's latent in the known cells: MSE, and the least-squares slope (1 = no shrink);
- with ``--percentiles``: the round trip after the k3 sampler's dynamic thresholding of the input's own latent at each
  percentile, i.e. what the sampler's last step leaves of a perfect x0 (the ceiling of the measure).

    python scripts/inpainting_known_region.py runs/nano-inpainting-one-2/export [MORE_MODELS] --num 64
"""

import argparse
from dataclasses import replace

import numpy as np
import torch

from kandinsky3 import Kandinsky3
from kandinsky3.diffusion.inpainting import latent_keep_mask
from kandinsky3.diffusion.schedule import dynamic_threshold
from kandinsky3.eval import inpainting as ev


def known_cells(cases, latent_size) -> torch.Tensor:
    """(N, 1, h, w) keep-masks at latent size, by the inpainting channels' own rule."""
    return latent_keep_mask(torch.stack([torch.from_numpy(c.mask)[None] for c in cases]), latent_size)


def measure(model: str, cases, steps: int, percentile: float | None = None) -> dict:
    pipe = Kandinsky3.from_pretrained(model)
    if percentile is not None:  # sample with another dynamic-thresholding percentile than the model's default
        pipe.variant = replace(pipe.variant, sampler=replace(pipe.variant.sampler, threshold_percentile=percentile))
    finals = []

    def keep_last(step, t, x):
        if step + 1 == steps:  # the run's last step: its x is the final latent
            finals.append(x.detach().float().cpu())

    outputs = ev.inpaint_cases(pipe, cases, [c.prompt for c in cases], steps=steps, progress=False, callback=keep_last)
    final = torch.cat(finals)
    true = torch.cat([pipe.encode_image(c.image) for c in cases]).cpu()
    keep = known_cells(cases, true.shape[-2:])
    swapped = keep * true + (1 - keep) * final
    with torch.no_grad():
        images_swapped = pipe._decode(swapped, "truncate")  # as the pipeline converts (its default rounding)
        images_roundtrip = pipe._decode(true, "truncate")
    known = keep.expand_as(true).bool()
    a, b = final[known], true[known]
    return {
        "raw": np.mean([ev.psnr_outside(o, c.image, c.mask) for o, c in zip(outputs, cases)]),
        "swapped": np.mean([ev.psnr_outside(o, c.image, c.mask) for o, c in zip(images_swapped, cases)]),
        "roundtrip": np.mean([ev.psnr_outside(o, c.image, c.mask) for o, c in zip(images_roundtrip, cases)]),
        "mse": float(((a - b) ** 2).mean()),
        "slope": float((a * b).sum() / (b * b).sum()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="inpainting model folders (or registered names)")
    parser.add_argument("--num", type=int, default=64, help="validation scenes (default 64)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (default 25, as the eval)")
    parser.add_argument("--threshold-percentile", type=float, help="sample at this percentile (default: the model's)")
    parser.add_argument("--percentiles", type=float, nargs="*", default=[], help="thresholding ceilings to print")
    args = parser.parse_args()
    cases = ev.make_cases(args.num, split="val")
    head = f"{'PSNR out':>10}{'known cells exact':>19}{'MoVQ round trip':>17}{'latent MSE':>12}{'slope':>7}"
    print(f"{'model':<44}{head}")
    for model in args.models:
        r = measure(model, cases, args.steps, args.threshold_percentile)
        print(
            f"{model:<44}{r['raw']:>7.2f} dB{r['swapped']:>16.2f} dB{r['roundtrip']:>14.2f} dB"
            f"{r['mse']:>12.5f}{r['slope']:>7.3f}"
        )
    if args.percentiles:
        pipe = Kandinsky3.from_pretrained(args.models[0])
        true = torch.cat([pipe.encode_image(c.image) for c in cases])
        for p in args.percentiles:
            images = pipe._decode(dynamic_threshold(true, p), "truncate")
            ceiling = np.mean([ev.psnr_outside(o, c.image, c.mask) for o, c in zip(images, cases)])
            print(f"MoVQ round trip after thresholding at p = {p}: {ceiling:.2f} dB")


if __name__ == "__main__":
    main()
