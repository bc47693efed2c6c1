"""KandiSuperRes timing: the official MultiDiffusion tiling against larger windows and the whole image.

    python benchmarks/superres.py                                   # nano upscaler on this CPU, 128 → 512 px
    python benchmarks/superres.py --model full --device cuda --dtype bf16   # full size (random weights), 1024 → 4096
    python benchmarks/superres.py --model tiny --size 32 --geometries 64:48,0  # smoke test of the full-size path

Each geometry ``WINDOW:STRIDE`` (output pixels; ``0`` = the whole image as one view) runs the same input, seed and
5 solver steps in one process. The first geometry is the reference: the table gives each one's time, speed-up
over it, and PSNR of its output against the reference output (how much the result moves) and, for the nano
model on shapes-world scenes, against the true high-res render. ``--blend`` picks the view merge (the official
one is ``uniform``). The default nano geometries are the official 4K ones scaled to the 512-px output (1024/4096
= 128/512): official-like 128:100, large 272:240 (2×2 views), whole image.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from PIL import Image

from kandinsky3.images import pil_to_tensor
from kandinsky3.superres import SuperRes


def clock(fn, device, repeats):
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = ((pil_to_tensor(a) - pil_to_tensor(b)) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def geometries(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        window, _, stride = item.partition(":")
        out.append((int(window), int(stride or window)))
    return out


def make_upscaler(args, device) -> SuperRes:
    if args.model == "nano":
        return SuperRes.from_pretrained("nano", device=device)
    from kandinsky3.checkpoints.loading import parse_dtype

    torch.manual_seed(0)
    if args.model == "tiny":
        unet = SuperRes.from_pretrained("tiny", device=device).unet
    else:
        from kandinsky3.models.superres import SuperResUNet

        unet = SuperResUNet().eval()
    unet = unet.to(device, parse_dtype(args.dtype))
    return SuperRes(unet, scale=4, device=device, name=f"{args.model} (random weights)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="nano",
        choices=["nano", "full", "tiny"],
        help="nano (trained, world scenes), full (413M, random weights) or tiny (random, smoke test)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="full / tiny only")
    ap.add_argument("--size", type=int, default=None, help="input side in px (default: 128 nano, 1024 full)")
    ap.add_argument(
        "--geometries",
        default=None,
        help="comma list of WINDOW:STRIDE in output px, 0 = whole image "
        "(default nano 128:100,272:240,0; full 1024:800,2176:1920,0)",
    )
    ap.add_argument("--blend", default="uniform", choices=["uniform", "ramp"])
    ap.add_argument("--view-batch-size", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scenes", type=int, default=3, help="nano: shapes-world scenes averaged for the PSNR columns")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = args.size or (128 if args.model == "nano" else 1024)
    geoms = geometries(args.geometries or ("128:100,272:240,0" if args.model == "nano" else "1024:800,2176:1920,0"))
    sr = make_upscaler(args, device)

    if args.model != "nano":  # a smooth synthetic input; with random weights only time and memory mean anything
        y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        rgb = torch.stack([x, y, 1 - (x + y) / 2], -1).mul(255).byte().numpy()
        pairs = [(Image.fromarray(rgb), None)]
    else:
        from kandinsky3.eval.superres import pairs_from_world

        pairs = list(pairs_from_world(args.scenes, 4, size))

    rows, reference = [], None
    for window, stride in geoms:

        def run(lr, window=window, stride=stride):
            return sr.upscale(
                lr,
                scale=4,
                seed=0,
                window=window,
                stride=stride,
                blend=args.blend,
                view_batch_size=args.view_batch_size,
                progress=False,
            )

        try:
            with torch.no_grad():
                seconds, _ = clock(lambda: run(pairs[0][0]), device, args.repeats)
                outputs = [run(lr) for lr, _ in pairs]
        except torch.OutOfMemoryError:
            rows.append((window, stride, None, None, None, None))
            torch.cuda.empty_cache()
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if reference is None:
            reference = (seconds, outputs)
        vs_ref = statistics.mean(psnr(o, r) for o, r in zip(outputs, reference[1]))
        vs_truth = None if pairs[0][1] is None else statistics.mean(psnr(o, hr) for o, (_, hr) in zip(outputs, pairs))
        rows.append((window, stride, seconds, vs_ref, vs_truth, peak))

    print(
        f"{sr.name}: {size} → {size * 4} px, 4×, {sr.steps} steps, blend {args.blend}, device {device}"
        f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}"
    )
    print("| window:stride | views | time s | speed-up | PSNR vs first dB | PSNR vs truth dB | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    from kandinsky3.diffusion.tiling import get_views

    side = size * 4
    for window, stride, seconds, vs_ref, vs_truth, peak in rows:
        views = 1 if window == 0 else len(get_views(side, side, window, stride))
        name = "whole image" if window == 0 else f"{window}:{stride}"
        if seconds is None:
            print(f"| {name} | {views} | out of memory | | | | |")
            continue

        def fmt(v):
            return "–" if v is None else ("∞" if math.isinf(v) else f"{v:.2f}")

        print(
            f"| {name} | {views} | {seconds:.2f} | {reference[0] / seconds:.2f}× | {fmt(vs_ref)} | {fmt(vs_truth)} "
            f"| {fmt(peak)} |"
        )


if __name__ == "__main__":
    main()
