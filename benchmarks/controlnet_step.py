"""One guided denoising step with the ControlNet vs without it, side by side in one process.

    python benchmarks/controlnet_step.py                          # CPU, nano + its ControlNet, batch 1
    python benchmarks/controlnet_step.py --batch 8 --repeats 9
    python benchmarks/controlnet_step.py --full --size 1024 --dtype bf16 --device cuda   # released sizes, random

Runs alternate (A B A B …) so drift affects both; prints the median time of a step (both guidance branches in one
U-Net batch, as the pipeline runs them) with and without the ControlNet's residuals, and their ratio. ``--full``
builds the released U-Net + ControlNet with random weights (no download) on ``--device``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kandinsky3.diffusion import Conditioning, Denoiser
from kandinsky3.diffusion.control import ControlAdapter


def parts(args):
    if not args.full:
        from kandinsky3 import Kandinsky3

        pipe = Kandinsky3.from_pretrained("nano", device=args.device, controlnet=args.controlnet)
        return pipe.unet, pipe.controlnet, pipe.variant.size, pipe.latent_factor
    from kandinsky3.checkpoints.controlnet import tiny_controlnet
    from kandinsky3.models import UNet, UNetConfig

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):
        unet = UNet(UNetConfig()).to(dtype).eval()
    net = tiny_controlnet(unet.config).to(args.device, dtype)
    return unet, net, args.size, 8


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="images per step (two U-Net rows each: guidance)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--full", action="store_true", help="the released sizes with random weights")
    ap.add_argument("--controlnet", default="nano-controlnet", help="nano: the ControlNet (a name or folder)")
    ap.add_argument("--size", type=int, default=1024, help="--full: image side in pixels")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    unet, net, size, factor = parts(args)
    dtype = next(unet.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    b, ctx_dim = args.batch, unet.config.context_dim
    context = torch.randn(b, 12, ctx_dim, generator=g)
    mask = torch.ones(b, 12, dtype=torch.long)
    cond = Conditioning(context, mask, torch.zeros_like(context), mask)
    x = torch.randn(b, 4, size // factor, size // factor, generator=g).to(device)
    hint = torch.rand(1, 3, size, size, generator=g)
    plain = Denoiser(unet, cond, 3.0)
    controlled = Denoiser(unet, cond, 3.0, [ControlAdapter(net, hint, 1.0, steps=10**6)])

    def timed(denoiser, t) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        denoiser(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(plain, 999), timed(controlled, 999)  # warm-up
    times = {"plain": [], "controlnet": []}
    for i in range(args.repeats):
        t = 998 - i  # a new timestep each call: the adapter counts it as the next step (inside its window)
        times["plain"].append(timed(plain, t))
        times["controlnet"].append(timed(controlled, t))
    a, c = statistics.median(times["plain"]), statistics.median(times["controlnet"])
    n_unet = sum(p.numel() for p in unet.parameters())
    n_net = sum(p.numel() for p in net.parameters())
    print(
        f"{'full (random)' if args.full else 'nano'} U-Net {n_unet / 1e6:.1f} M + ControlNet {n_net / 1e6:.2f} M, "
        f"{size}² px, batch {b} (×2 guidance), {dtype}, {device}, {torch.get_num_threads()} threads"
    )
    print(f"step without ControlNet: {a * 1e3:.1f} ms   with: {c * 1e3:.1f} ms   ratio {c / a:.2f}×")


if __name__ == "__main__":
    main()
