"""MoVQ decode whole (the official K3 default) vs tiled (the ``movq_tiling`` option): time, peak memory, pixels.

    python benchmarks/movq_tiling.py                        # nano MoVQ (64-px tiles), 1088×640 and 1024², CPU
    python benchmarks/movq_tiling.py --sizes 2048x2048 --full --device cuda   # released architecture, random weights

Time: median of alternating runs in one process. Peak memory: each mode decodes once in a fresh child process;
the figure is the child's peak resident memory (VmHWM, reset before decoding) above what it held (CPU), or
``torch.cuda.max_memory_allocated`` (GPU). Pixels: the largest and mean difference in 8-bit levels of the clipped
images; nano decodes the latent of a canvas of held-out shapes-world scenes, the full-size MoVQ a random latent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def build_movq(full: bool, device: str):
    from kandinsky3.models import MoVQ
    from kandinsky3.registry import VARIANTS

    if full:
        return MoVQ(VARIANTS["base"].movq).to(device).eval()
    from safetensors.torch import load_file

    movq = MoVQ(VARIANTS["nano"].movq)  # only the MoVQ: a light process, so its peak memory is the decoder's
    movq.load_state_dict({k: v.float() for k, v in load_file(VARIANTS["nano"].local_dir / "movq.safetensors").items()})
    return movq.to(device).eval()


def latent(movq, width: int, height: int, full: bool, device: str) -> torch.Tensor:
    """nano: the latent of a canvas of shapes-world scenes (what nano decodes); full: random (random weights)."""
    factor = movq.config.downsample_factor
    if full:
        return torch.randn(1, 4, height // factor, width // factor, generator=torch.Generator().manual_seed(0)).to(
            device
        )
    from kandinsky3.images import pil_to_tensor
    from kandinsky3.world.dataset import world_sample

    tiles = [pil_to_tensor(world_sample(i, "test").image) for i in range((height // 64 + 1) * (width // 64 + 1))]
    rows = [
        torch.cat(tiles[r * (width // 64 + 1) : (r + 1) * (width // 64 + 1)], dim=-1) for r in range(height // 64 + 1)
    ]
    canvas = torch.cat(rows, dim=-2)[..., :height, :width].to(device)
    with torch.no_grad():
        return movq.encode_untiled(canvas)


def _rss_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset VmHWM (the peak resident set) to the current RSS
        f.write("5")


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB → MiB


def _peak(args):
    full, device, z, tiled = args
    movq = build_movq(full, device)
    z = z.to(device)
    _rss_peak_reset()
    before = _rss("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        movq.decode(z, tiled=tiled)
    if device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _rss("VmHWM") - before


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1088x640", "1024x1024"], help="WIDTHxHEIGHT in pixels")
    p.add_argument("--full", action="store_true", help="the released MoVQ architecture (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    movq = build_movq(args.full, args.device)
    print(f"MoVQ tile: {movq.config.tile_sample_min_size} px; device {args.device}; torch {torch.__version__}")
    print(
        "| size | whole | tiled | time ratio | peak memory whole | peak memory tiled | max Δ levels | mean Δ levels |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for size in args.sizes:
        width, height = map(int, size.lower().split("x"))
        z = latent(movq, width, height, args.full, args.device)
        times = {False: [], True: []}
        outputs = {}
        with torch.no_grad():
            for _ in range(args.repeats):
                for tiled in (False, True):
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    outputs[tiled] = movq.decode(z, tiled=tiled)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[tiled].append(time.perf_counter() - t)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            peaks = {tiled: pool.apply(_peak, ((args.full, args.device, z.cpu(), tiled),)) for tiled in (False, True)}
        levels = ((outputs[True].clamp(-1, 1) - outputs[False].clamp(-1, 1)).float() / 2 * 255).abs()
        whole, tiled = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"| {width}×{height} | {whole:.2f} s | {tiled:.2f} s | {tiled / whole:.2f}× | {peaks[False]:.0f} MiB | "
            f"{peaks[True]:.0f} MiB | {levels.max():.1f} | {levels.mean():.2f} |"
        )


if __name__ == "__main__":
    main()
