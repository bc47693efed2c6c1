"""Whole-generation timing, split into text encoding, U-Net steps and MoVQ decoding.

    python benchmarks/generation.py --model nano               # the embedded model on this CPU (50 steps, CFG)
    python benchmarks/generation.py --model nano --sampler flash
    python benchmarks/generation.py --model nano --against path/to/other/model --repeats 7   # side by side
    python benchmarks/generation.py --movq-only --full --size 1024 --device cuda   # MoVQ decode variants, full size

For the MoVQ it also compares the decode variants side by side: fp32, bf16, and bf16 + channels_last, with the
largest difference to the fp32 output.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kandinsky3 import Kandinsky3, TextToImage
from kandinsky3.models import MoVQ
from kandinsky3.registry import VARIANTS


def clock(fn, device, repeats=3):
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out), result


PROMPT = "a red circle in the top left on a gray background"


def generation(args):
    """Time ``--model`` (and ``--against``, alternating with it in this process, so a machine whose speed drifts
    affects both alike)."""
    device = torch.device(args.device)
    names = [args.model] + ([args.against] if args.against else [])
    pipes = [Kandinsky3.from_pretrained(name, device=device) for name in names]
    totals = [[] for _ in pipes]
    with torch.no_grad():
        for _ in range(args.repeats):
            for pipe, times in zip(pipes, totals):
                times.append(
                    clock(
                        lambda: pipe.generate(PROMPT, seed=0, sampler=args.sampler, progress=False), device, repeats=1
                    )[0]
                )
        for name, pipe, times in zip(names, pipes, totals):
            s = TextToImage(prompt=PROMPT, sampler=args.sampler).resolve(pipe.variant)
            enc, _ = clock(lambda: pipe.text_encoder.encode([PROMPT]), device)
            latent = torch.randn(1, pipe.latent_channels, s.height // pipe.latent_factor, s.width // pipe.latent_factor)
            dec, _ = clock(lambda: pipe.movq.decode(latent.to(device)), device)
            total = statistics.median(times)
            print(
                f"{name} ({pipe.variant.name}): {s.width}x{s.height}, sampler {s.sampler}, {s.steps} steps, "
                f"guidance {s.guidance}, device {device}, {torch.get_num_threads()} threads"
            )
            print(
                f"whole generation {total:.3f} s, median of {len(times)}  (text encoder {enc * 1000:.1f} ms, MoVQ "
                f"decode {dec * 1000:.1f} ms, U-Net steps + rest {total - enc - dec:.3f} s)"
            )
    if args.against:
        # each repeat times both back to back, so the ratio within a repeat is what a drifting machine spoils least
        ratios = sorted(b / a for a, b in zip(*totals))
        print(
            f"{args.against} takes {statistics.median(ratios):.2f}x the time of {args.model} (median of the "
            f"{len(ratios)} per-repeat ratios, range {ratios[0]:.2f}-{ratios[-1]:.2f}; ratio of the medians "
            f"{statistics.median(totals[1]) / statistics.median(totals[0]):.2f}x)"
        )


def movq_variants(args):
    device = torch.device(args.device)
    config = VARIANTS["base"].movq if args.full else VARIANTS["tiny"].movq
    movq = MoVQ(config).eval()
    g = torch.Generator().manual_seed(0)
    for p in movq.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(device)
    results = {}
    with torch.no_grad():
        ref_model = movq.to(device)
        t32, ref = clock(lambda: ref_model.decode(z), device)
        results["fp32"] = (t32, 0.0)
        for name, fmt in (("bf16", torch.contiguous_format), ("bf16 + channels_last", torch.channels_last)):
            m = MoVQ(config).eval()
            m.load_state_dict(movq.state_dict())
            m = m.to(device, torch.bfloat16).to(memory_format=fmt)
            zz = z.to(torch.bfloat16).contiguous(memory_format=fmt)
            t, out = clock(lambda: m.decode(zz), device)
            results[name] = (t, (out.float() - ref).abs().max().item())
    print(f"MoVQ decode {args.size}x{args.size} ({'full 270M' if args.full else 'tiny'}), device {device}")
    for name, (t, d) in results.items():
        print(f"  {name:22s} {t * 1000:9.1f} ms   speed-up {results['fp32'][0] / t:5.2f}x   max |Δ| vs fp32 {d:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nano")
    ap.add_argument("--against", default=None, help="a reference model, timed alternately in the same process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--movq-only", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    if args.movq_only:
        movq_variants(args)
    else:
        generation(args)


if __name__ == "__main__":
    main()
