"""Render the README / docs grid of nano results: each row a caption, 4 seeds, with the judge's verdict.

python scripts/nano_grid.py --out docs/nano_grid.png
"""

import argparse

from PIL import Image, ImageDraw

from kandinsky3 import Kandinsky3
from kandinsky3.world import judge

CAPTIONS = [
    "a red circle in the top left on a gray background",
    "a large blue square in the center, white background",
    "a small yellow star at the bottom right on a black background",
    "a green triangle on the left and a purple circle on the right, gray background",
    "a big white star at the top and a small red square at the bottom on a blue background",
    "a green star in the center on a black background",  # a held-out colour+shape pair
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/nano_grid.png")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--cell", type=int, default=128)
    args = ap.parse_args()
    pipe = Kandinsky3.from_pretrained(device="cpu")
    c, label_w = args.cell, 470
    grid = Image.new("RGB", (label_w + c * args.seeds, c * len(CAPTIONS)), "white")
    draw = ImageDraw.Draw(grid)
    for row, caption in enumerate(CAPTIONS):
        images = pipe.generate([caption] * args.seeds, seed=row, progress=False)
        draw.text((6, row * c + c // 2 - 12), caption[:70] + ("…" if len(caption) > 70 else ""), fill="black")
        for col, image in enumerate(images):
            grid.paste(image.resize((c, c), Image.NEAREST), (label_w + col * c, row * c))
            ok = judge(image, caption).aligned
            draw.text(
                (label_w + col * c + 4, row * c + 2), "OK" if ok else "X", fill=(0, 160, 0) if ok else (200, 0, 0)
            )
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
