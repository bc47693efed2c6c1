"""One guided denoising step with the IP-Adapter's image tokens vs without, side by side in one process.

    python benchmarks/ip_adapter_step.py                          # CPU, nano + a nano-shaped adapter, batch 1
    python benchmarks/ip_adapter_step.py --batch 8 --repeats 9
    python benchmarks/ip_adapter_step.py --full --size 1024 --dtype bf16 --device cuda   # released sizes, random

Runs alternate (A B A B …) so drift affects both; prints the median time of a step (both guidance branches in one
U-Net batch, as the pipeline runs them) with and without the adapter, and their ratio. The image tokens are
computed once per generation, not per step, so the per-step cost is the extra key/value projection of 4 tokens and
one more attention per text cross-attention layer. ``--full`` builds the released U-Net + adapter with random
weights (no download) on ``--device``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kandinsky3.diffusion import Conditioning, Denoiser
from kandinsky3.diffusion.image_prompt import ImagePrompt
from kandinsky3.models.ip_adapter import IPAdapter, IPAdapterConfig
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.registry import VARIANTS


def build(args):
    config = UNetConfig() if args.full else VARIANTS["nano"].unet
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        unet = UNet(config).to(dtype).eval()
        adapter = IPAdapter(IPAdapterConfig(768 if args.full else 64, unet=config)).to(dtype).eval()
    for p in adapter.parameters():  # non-zero to_out_ip: the full computation runs either way
        p.data.normal_(0, 0.02)
    return unet, adapter.attach(unet), dtype


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the released U-Net and adapter sizes, random weights")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: 64 nano, 1024 full)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    unet, adapter, dtype = build(args)
    size = args.size or (1024 if args.full else 64)
    latent = size // 8
    b, ctx = args.batch, unet.config.context_dim
    x = torch.randn(b, 4, latent, latent, device=args.device)
    cond = Conditioning(
        torch.randn(b, 8, ctx, device=args.device),
        torch.ones(b, 8, dtype=torch.long, device=args.device),
        torch.zeros(b, 8, ctx, device=args.device),
        torch.zeros(b, 8, dtype=torch.long, device=args.device),
    )
    with torch.no_grad():
        e = torch.randn(2, adapter.config.image_embed_dim, device=args.device, dtype=dtype)
        tokens = adapter.image_tokens(e)
    prompt = ImagePrompt(tokens[:1].expand(b, -1, -1), tokens[1:].expand(b, -1, -1), torch.ones(b), {}, adapter)
    plain = Denoiser(unet, cond, 3.0)
    with_ip = Denoiser(unet, cond, 3.0, [prompt])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {"plain": [], "ip-adapter": []}
    for _ in range(2):  # warm-up
        plain(x, 500), with_ip(x, 500)
    for _ in range(args.repeats):
        for name, denoiser in (("plain", plain), ("ip-adapter", with_ip)):
            sync()
            start = time.perf_counter()
            denoiser(x, 500)
            sync()
            times[name].append(time.perf_counter() - start)
    a, c = statistics.median(times["plain"]), statistics.median(times["ip-adapter"])
    what = "full size (random)" if args.full else "nano"
    print(f"{what}, {size}px, batch {b} (×2 guidance branches), {args.device} {args.dtype}, {args.repeats} repeats")
    print(f"plain U-Net step:        {1000 * a:8.2f} ms")
    print(f"with IP-Adapter tokens:  {1000 * c:8.2f} ms   ({c / a:.3f}×, +{100 * (c / a - 1):.1f} %)")


if __name__ == "__main__":
    main()
