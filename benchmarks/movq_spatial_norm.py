"""MoVQ decode with the spatial norm's modulation at the latent's resolution (as shipped) vs the official order
(zq resized to every feature map, then two 1×1 convolutions at full resolution), side by side in one process.

    python benchmarks/movq_spatial_norm.py                                  # released MoVQ, random, 512², CPU fp32
    python benchmarks/movq_spatial_norm.py --size 1024 --dtype bf16 --device cuda

Both compute the same numbers (nearest upsampling by whole factors commutes with 1×1 convolutions; the largest
difference is printed); the shipped order skips two C-channel full-resolution convolutions and their outputs per
norm. Runs alternate (A B A B …); medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from kandinsky3.models import MoVQ
from kandinsky3.models.movq import SpatialNorm
from kandinsky3.registry import VARIANTS


def official_forward(self, f, zq=None):
    norm_f = self.norm_layer(f)
    return norm_f if zq is None else self.modulate_in_official_order(norm_f, zq)


@contextmanager
def official_order():
    shipped = SpatialNorm.forward
    SpatialNorm.forward = official_forward
    try:
        yield
    finally:
        SpatialNorm.forward = shipped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="output side in pixels")
    ap.add_argument("--model", default="base", help="a registered variant's MoVQ architecture (base, nano)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = VARIANTS[args.model].movq
    torch.manual_seed(0)
    with torch.device(args.device):
        movq = MoVQ(config).to(dtype).eval()
    f = config.downsample_factor
    z = torch.randn(1, config.embed_dim, args.size // f, args.size // f, device=args.device, dtype=dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def shipped():
        return movq.decode(z, tiled=False)

    def official():
        with official_order():
            return movq.decode(z, tiled=False)

    times = {"official": [], "shipped": []}
    with torch.no_grad():
        outs = {"official": official(), "shipped": shipped()}  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("official", official), ("shipped", shipped)):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    a, b = statistics.median(times["official"]), statistics.median(times["shipped"])
    diff = (outs["official"].float() - outs["shipped"].float()).abs().max().item()
    print(
        f"MoVQ ({args.model}) decode {args.size}², {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(
        f"official order: {1000 * a:9.1f} ms   latent-resolution modulation: {1000 * b:9.1f} ms   "
        f"{a / b:.2f}×   max |Δ| {diff:.2e} (outputs ≤ {outs['official'].abs().max().item():.2f})"
    )


if __name__ == "__main__":
    main()
