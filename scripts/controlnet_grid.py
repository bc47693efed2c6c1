"""The picture in docs/controlnet.md: unseen scenes → their soft-edge hints → nano + ControlNet under several prompts.

    python scripts/controlnet_grid.py --out docs/controlnet_grid.png [--controlnet runs/nano-controlnet-3/export]

Each row is one test-split scene: its render, the hint (soft edges, as ``control()`` extracts them), then the
ControlNet's pictures for the caption without positions, for two recolourings, and the plain nano for the caption
without positions (it can only guess where things go). Pictures are upscaled 2× (nearest) for the page.
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from kandinsky3 import Kandinsky3
from kandinsky3.edges import extract_edges
from kandinsky3.eval.controlnet import _caption, _recolour, control_cases
from kandinsky3.world import world_sample

COLUMNS = ["scene", "hint", "caption, no positions", "other colours", "other colours", "plain nano"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/controlnet_grid.png")
    ap.add_argument("--scenes", type=int, nargs="+", default=[1, 3, 4, 7])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--controlnet", default=None, help="a ControlNet folder (default: nano's own)")
    args = ap.parse_args()
    import random

    pipe = Kandinsky3.from_pretrained("nano", device="cpu", controlnet=args.controlnet)
    cases = control_cases(max(args.scenes) + 1)
    rng = random.Random(1)
    rows = []
    for i in args.scenes:
        case, scene = cases[i], world_sample(i, "test", 64, num_objects=(1, 2, 1, 2, 3)[i % 5]).scene
        other = _recolour(scene, rng)
        prompts = [
            case.layout_caption,
            case.look_caption,
            _caption([(c, o.shape, o.size) for c, o in zip(other, scene.objects)], scene.background),
        ]
        images = pipe.control(case.image, prompts, seed=args.seed, progress=False)
        [plain] = pipe.generate(case.layout_caption, seed=args.seed, progress=False)
        rows.append(([case.image, extract_edges(case.image), *images, plain], prompts))
    cell, pad, text_h = 128, 4, 14
    width = len(COLUMNS) * (cell + pad) + pad
    grid = Image.new("RGB", (width, text_h + len(rows) * (cell + pad + 2 * text_h) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(COLUMNS):
        draw.text((pad + c * (cell + pad), 2), name, fill="black")
    for r, (pictures, prompts) in enumerate(rows):
        y = text_h + r * (cell + pad + 2 * text_h)
        for c, picture in enumerate(pictures):
            grid.paste(picture.resize((cell, cell), Image.NEAREST), (pad + c * (cell + pad), y))
        draw.text((pad, y + cell + 1), " | ".join(prompts[:2]), fill="black")
        draw.text((pad, y + cell + text_h), prompts[2], fill="black")
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
