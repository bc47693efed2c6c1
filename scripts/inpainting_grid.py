"""The picture grid of docs/inpainting.md: held-out scenes, the removed object's mask, and the outputs of
nano-inpainting under several captions, beside the random-mask model and nano by latent blending asked for the
different object. `python scripts/inpainting_grid.py --out docs/inpainting_grid.png`"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from kandinsky3 import Kandinsky3
from kandinsky3.eval.inpainting import blending_pipeline, inpaint_cases, make_cases


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="nano-inpainting")
    p.add_argument("--random-masks", default="runs/nano-inpainting-random/export")
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="docs/inpainting_grid.png")
    args = p.parse_args()

    cases = make_cases(args.scenes)
    model = Kandinsky3.from_pretrained(args.model)
    columns = {
        "input": [c.image for c in cases],
        "mask": [Image.fromarray((c.mask * 255).astype("uint8")).convert("RGB") for c in cases],
        "its caption": inpaint_cases(model, cases, [c.prompt for c in cases], args.steps, progress=False),
        "other object": inpaint_cases(model, cases, [c.other_prompt for c in cases], args.steps, progress=False),
        "'a small white star'": inpaint_cases(
            model, cases, ["a small white star"] * len(cases), args.steps, progress=False
        ),
    }
    if args.random_masks:
        random_model = Kandinsky3.from_pretrained(args.random_masks)
        columns["random masks: other"] = inpaint_cases(
            random_model, cases, [c.other_prompt for c in cases], args.steps, progress=False
        )
    blend = blending_pipeline(Kandinsky3.from_pretrained("nano"))
    columns["blending: other"] = inpaint_cases(
        blend, cases, [c.other_prompt for c in cases], args.steps, progress=False
    )

    side, head = 64 * 3, 14
    grid = Image.new("RGB", (side * len(columns), head + side * len(cases)), "white")
    draw = ImageDraw.Draw(grid)
    for x, (name, images) in enumerate(columns.items()):
        draw.text((x * side + 3, 1), name, fill="black")
        for y, im in enumerate(images):
            grid.paste(im.resize((side, side), Image.NEAREST), (x * side, head + y * side))
    grid.save(args.out)
    for c in cases:
        print(f"scene {c.index}: caption {c.prompt!r}; other {c.other_prompt!r}")


if __name__ == "__main__":
    main()
