"""Super-resolution evaluation: PSNR, SSIM, L1 (and FID where its Inception weights are available) of an
upscaler against bicubic and Lanczos baselines on the same images."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..images import pil_to_tensor


def _t(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], the range torchmetrics is given."""
    return (pil_to_tensor(image) + 1) / 2


def pairs_from_folder(hr_dir, scale: int, limit: int | None = None):
    """(low-res, high-res) pairs: each HR image cropped to a multiple of ``scale``, LR = its bicubic downscale."""
    files = sorted(p for p in Path(hr_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise FileNotFoundError(f"no images in {hr_dir}")
    for path in files[:limit]:
        hr = Image.open(path).convert("RGB")
        hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
        yield hr.resize((hr.width // scale, hr.height // scale), Image.BICUBIC), hr


def pairs_from_world(num: int, scale: int, size: int = 64):
    """Held-out shapes-world scenes: the real low-res render and the same scene at ``size·scale``."""
    from ..world import render, world_sample

    for i in range(num):
        s = world_sample(i, "test", size)
        yield s.image, render(s.scene, size * scale).image


def evaluate_superres(upscaler, pairs, scale: int, seed: int = 0, fid: bool = True, progress: bool = True) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from tqdm.auto import tqdm

    methods = {
        "model": lambda lr: upscaler.upscale(lr, scale=scale, seed=seed, progress=False),
        "bicubic": lambda lr: lr.resize((lr.width * scale, lr.height * scale), Image.BICUBIC),
        "lanczos": lambda lr: lr.resize((lr.width * scale, lr.height * scale), Image.LANCZOS),
    }
    sums = {m: {"psnr": 0.0, "ssim": 0.0, "l1": 0.0} for m in methods}
    outputs = {m: [] for m in methods}
    highs, n = [], 0
    for lr, hr in tqdm(list(pairs), desc="super-resolution eval", disable=not progress):
        target = _t(hr)
        highs.append(target)
        for name, fn in methods.items():
            pred = _t(fn(lr))
            outputs[name].append(pred)
            sums[name]["psnr"] += float(peak_signal_noise_ratio(pred, target, data_range=1.0))
            sums[name]["ssim"] += float(structural_similarity_index_measure(pred, target, data_range=1.0))
            sums[name]["l1"] += float((pred - target).abs().mean())
        n += 1
    table = {m: {k: v / n for k, v in s.items()} for m, s in sums.items()}
    if fid:
        table["fid_note"] = _fid(outputs, highs, table)
    table["n"] = n
    return table


def _fid(outputs, highs, table) -> str:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        for name, preds in outputs.items():
            metric = FrechetInceptionDistance(normalize=True)
            for x in highs:
                metric.update(x, real=True)
            for x in preds:
                metric.update(x, real=False)
            table[name]["fid"] = float(metric.compute())
        return "computed"
    except Exception as exc:  # the Inception weights are downloaded on first use: offline, say so
        return f"FID skipped: its Inception feature weights are not available ({type(exc).__name__})"


def format_table(table: dict) -> str:
    lines = [
        f"{'method':<10}{'PSNR dB':>9}{'SSIM':>8}{'L1':>8}" + ("" if "fid" not in table["model"] else f"{'FID':>8}")
    ]
    for m in ("model", "bicubic", "lanczos"):
        r = table[m]
        line = f"{m:<10}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['l1']:>8.4f}"
        if "fid" in r:
            line += f"{r['fid']:>8.2f}"
        lines.append(line)
    lines.append(f"({table['n']} images; {table.get('fid_note', 'FID not requested')})")
    return "\n".join(lines)
