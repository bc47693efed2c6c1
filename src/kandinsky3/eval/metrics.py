"""Image metrics on tensors in [-1, 1] or PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _as_float(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        return ((image.detach().double().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.float64)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, 1] (PIL, or tensors in [-1, 1])."""
    mse = float(np.mean((_as_float(a) - _as_float(b)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@torch.no_grad()
def movq_psnr(movq, images: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR of MoVQ reconstructions of (N, 3, H, W) images in [-1, 1], after the official [0, 1] clip."""
    p = next(movq.parameters())
    values = []
    for chunk in images.split(batch):
        recon = movq.decode(movq.encode(chunk.to(p.device, p.dtype))).float().cpu()
        values.extend(psnr(x, y) for x, y in zip(chunk, recon.clamp(-1, 1)))
    return float(np.mean(values))
