"""Edge-extractor cost: the soft extractor at training and user sizes, and the HED network (random weights: the
same cost as the real ones).

    python benchmarks/edges.py                 # CPU, median of 5
    python benchmarks/edges.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kandinsky3.edges import hed_edges, soft_edges
from kandinsky3.models.hed import HED


def clock(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hed = HED().eval().to(device)
    cases = [
        ("soft", 64, 64, lambda x: soft_edges(x)),
        ("soft", 1, 512, lambda x: soft_edges(x)),
        ("soft", 1, 1024, lambda x: soft_edges(x)),
        ("hed", 1, 512, lambda x: hed_edges(hed, x)),
    ]
    print(f"{'method':<6} {'batch':>5} {'size':>5} {'median':>10}  ({device}, {torch.get_num_threads()} threads)")
    for name, batch, size, fn in cases:
        x = torch.rand(batch, 3, size, size, generator=g).to(device)
        with torch.no_grad():
            seconds = clock(lambda: fn(x), device, args.repeats)
        print(f"{name:<6} {batch:>5} {size:>5} {seconds * 1000:>8.1f} ms")


if __name__ == "__main__":
    main()
