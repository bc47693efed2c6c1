"""The docs grid of the nano IP-Adapter (docs/ip_adapter.png): rows of a reference and 4 variations, then mixes
(reference A, reference B, mixes at (1, 0), (0.5, 0.5), (0, 1)), then image + text (reference, its variations on
three backgrounds named by the text). Held-out test renders; 4× nearest-neighbour upscaled for reading.

    python scripts/ip_adapter_grid.py --out docs/ip_adapter.png
    python scripts/ip_adapter_grid.py --ip-adapter runs/nano-ip-adapter-v6/export \
        --image-encoder runs/nano-clip-v5/export
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from kandinsky3 import Kandinsky3
from kandinsky3.eval.ip_adapter import mix_pairs, references

CELL = 64
SCALE = 3


def row(images, label, width):
    canvas = Image.new("RGB", (width, CELL * SCALE + 14), "white")
    ImageDraw.Draw(canvas).text((2, 1), label, fill="black")
    for i, im in enumerate(images):
        canvas.paste(im.resize((CELL * SCALE, CELL * SCALE), Image.NEAREST), (i * (CELL * SCALE + 4), 14))
    return canvas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/ip_adapter.png")
    ap.add_argument("--model", default="nano")
    ap.add_argument("--ip-adapter", help="an adapter folder instead of the model's own")
    ap.add_argument("--image-encoder", help="the CLIP it reads images with, when not the one its file names")
    args = ap.parse_args()
    pipe = Kandinsky3.from_pretrained(args.model, device="cpu")
    if args.ip_adapter or args.image_encoder:
        pipe.get_ip_adapter(args.ip_adapter, image_encoder=args.image_encoder)
    width = 5 * (CELL * SCALE + 4)
    rows = []
    for s in references(3, seed=5):
        outs = pipe.variation(s.image, num_images=4, seed=[0, 1, 2, 3], progress=False)
        rows.append(row([s.image, *outs], "reference, then variations (empty prompt)", width))
    for a, b in mix_pairs(2, seed=6):
        mixes = [
            pipe.mix([a.image, b.image], w, seed=0, progress=False)[0] for w in ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])
        ]
        rows.append(row([a.image, b.image, *mixes], "A, B, then mixes at (1, 0), (0.5, 0.5), (0, 1)", width))
    for s in references(2, seed=7):
        outs = [
            pipe.generate(f"on a {bg} background", image=s.image, seed=0, progress=False)[0]
            for bg in ("white", "black", "gray", "yellow")
        ]
        rows.append(row([s.image, *outs], "reference + 'on a white / black / gray / yellow background'", width))
    grid = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
