"""One U-Net step: ours vs diffusers' Kandinsky3UNet, identical weights and inputs, side by side in one process.

    python benchmarks/unet_step.py                         # CPU, small config (the default on a CPU machine)
    python benchmarks/unet_step.py --full --size 1024 --dtype bf16 --device cuda --batch 2   # full 3B U-Net on a GPU

Runs alternate between the two models (A B A B …) so drift affects both; prints the median time per step, the
ratio and, on CUDA, the peak memory of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kandinsky3.checkpoints import keymaps
from kandinsky3.models import UNet, UNetConfig
from kandinsky3.registry import VARIANTS

SMALL = UNetConfig(
    model_channels=64,
    init_channels=32,
    time_embed_dim=256,
    context_dim=256,
    dim_mult=(1, 2, 4, 8),
    num_blocks=(2, 2, 2, 2),
)


def build(config: UNetConfig, dtype, device):
    import diffusers

    ours = UNet(config)
    g = torch.Generator().manual_seed(0)
    for p in ours.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    projection = {
        "0.weight": torch.randn(config.context_dim, config.context_dim, generator=g) * 0.02,
        "1.weight": torch.ones(config.context_dim),
        "1.bias": torch.zeros(config.context_dim),
    }
    cfg = {k: v for k, v in keymaps.unet_config_to_diffusers(config).items() if not k.startswith("_")}
    theirs = diffusers.Kandinsky3UNet(**cfg)
    theirs.load_state_dict(keymaps.unet_to_diffusers(ours.state_dict(), projection))
    ours = ours.to(device, dtype).eval()
    theirs = theirs.to(device, dtype).eval()
    proj = torch.nn.Sequential(
        torch.nn.Linear(config.context_dim, config.context_dim, bias=False), torch.nn.LayerNorm(config.context_dim)
    ).to(device, dtype)
    proj[0].weight.data.copy_(projection["0.weight"])
    return ours, theirs, proj


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_memory(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the released 3B config (random weights)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size/8)")
    ap.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one image with guidance)")
    ap.add_argument("--tokens", type=int, default=20, help="context length")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of ours")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    config = VARIANTS["base"].unet if args.full else SMALL
    ours, theirs, proj = build(config, dtype, device)
    g = torch.Generator().manual_seed(1)
    h = args.size // 8
    x = torch.randn(args.batch, 4, h, h, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500.0, device=device)
    raw = torch.randn(args.batch, args.tokens, config.context_dim, generator=g).to(device, dtype)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.long, device=device)
    mask[:, args.tokens // 2 :] = 0
    with torch.no_grad():
        context = proj(raw)
        run_ours = lambda: ours(x, t, context, mask)  # noqa: E731
        run_theirs = lambda: theirs(x, t, raw, mask).sample  # noqa: E731
        diff = (run_ours().float() - run_theirs().float()).abs().max().item()
        for fn in (run_ours, run_theirs):  # warm-up
            fn()
        times = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            times["ours"].append(timed(run_ours, device))
            times["diffusers"].append(timed(run_theirs, device))
        mem = {"ours": peak_memory(run_ours, device), "diffusers": peak_memory(run_theirs, device)}
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in ours.parameters())
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype {args.dtype}, "
        f"U-Net {params / 1e6:.1f}M params, batch {args.batch}, latent {h}x{h}, {args.tokens} tokens"
    )
    print(f"max |ours - diffusers| = {diff:.2e}")
    for k in ("ours", "diffusers"):
        m = f", peak {mem[k]:.2f} GiB" if mem[k] is not None else ""
        print(f"{k:10s} median {med[k] * 1000:8.1f} ms/step{m}")
    print(f"speed-up ours vs diffusers: {med['diffusers'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
