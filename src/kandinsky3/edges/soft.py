"""The offline soft-edge extractor: a classical, HED-like edge map with no network and no download.

Sobel gradient magnitude on each RGB channel (so edges between colours of equal brightness count), the maximum over
channels, a Gaussian blur (HED's maps are soft, a few pixels wide), then each image divided by its own strongest
edge. Deterministic, and cheap enough to run on the fly in training (64×64, batch 64: about 50 ms on one CPU thread).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: a unit step (0 → 1) gives a Sobel magnitude of 4 (the kernel's column weights 1 + 2 + 1)
_SOBEL_STEP = 4.0


def _sobel_kernels(dtype: torch.dtype, device) -> torch.Tensor:
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype, device=device)
    return torch.stack([gx, gx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy


def _gaussian_1d(sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps, edges replicated."""
    if sigma <= 0:
        return maps
    kernel = _gaussian_1d(sigma, maps.dtype, maps.device)
    r = kernel.numel() // 2
    out = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W): the largest per-channel Sobel magnitude, 1.0 for a unit step."""
    b, c, h, w = images.shape
    flat = F.pad(images.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(flat, _sobel_kernels(images.dtype, images.device))
    magnitude = torch.hypot(grad[:, 0], grad[:, 1]).reshape(b, c, h, w) / _SOBEL_STEP
    magnitude = torch.where(magnitude > 1e-5, magnitude, 0.0)  # float rounding in flat regions → exactly 0
    return magnitude.amax(dim=1, keepdim=True)


def soft_edges(images: torch.Tensor, sigma: float = 1.0, min_contrast: float = 0.05) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → (B, 1, H, W) soft edge maps in [0, 1] (1 on the strongest edge of each image).

    ``sigma``: the blur in pixels (edge width). ``min_contrast``: an image whose strongest (blurred) edge is
    weaker than this is not stretched to 1, so flat or nearly flat images stay near 0 instead of amplifying noise.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"soft_edges takes a tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"soft_edges takes RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"soft_edges takes float images in [0, 1], got {images.dtype}; divide uint8 pixels by 255")
    dtype = images.dtype
    x = images.float() if dtype in (torch.float16, torch.bfloat16) else images
    edges = gaussian_blur(gradient_magnitude(x.clamp(0, 1)), sigma)
    peak = edges.amax(dim=(2, 3), keepdim=True).clamp_min(min_contrast)
    return (edges / peak).clamp(0, 1).to(dtype)
