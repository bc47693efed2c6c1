"""The docs picture of docs/edges.md: held-out world renders, their true outlines, soft edges, soft edges --safe.

python scripts/edges_figure.py --out docs/edges.png
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from kandinsky3.edges import extract_edges
from kandinsky3.world import render, world_sample
from kandinsky3.world.render import outlines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/edges.png")
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    rows = []
    for i in range(args.num):
        scene = world_sample(i, "test", 8).scene
        image = render(scene, args.size).image
        truth = Image.fromarray(np.stack([outlines(scene, args.size) * np.uint8(255)] * 3, axis=-1))
        tiles = [image, truth, extract_edges(image), extract_edges(image, safe=True)]
        rows.append(np.concatenate([np.asarray(t) for t in tiles], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
