"""Real-ESRGAN-style second-order degradation: (blur → resize → noise → JPEG) twice, each step randomised,
then a resize to the low-resolution size. Turns a high-res crop into a realistic low-res input."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class DegradationConfig:
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_prob: float = 0.9
    resize_range: tuple[float, float] = (0.3, 1.5)
    noise_sigma: tuple[float, float] = (1.0, 25.0)  # in 0..255 units
    noise_prob: float = 0.8
    jpeg_quality: tuple[int, int] = (30, 95)
    second_order_prob: float = 0.8
    # second stage, milder (as Real-ESRGAN)
    blur_sigma_2: tuple[float, float] = (0.2, 1.5)
    noise_sigma_2: tuple[float, float] = (1.0, 20.0)


def gaussian_kernel(sigma_x: float, sigma_y: float, angle: float, size: int = 21) -> torch.Tensor:
    """An anisotropic Gaussian kernel (size × size), normalised to sum 1."""
    ax = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _blur(x: torch.Tensor, rng: random.Random, sigma_range) -> torch.Tensor:
    k = gaussian_kernel(rng.uniform(*sigma_range), rng.uniform(*sigma_range), rng.uniform(0, math.pi))
    pad = k.shape[-1] // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, k[None, None].expand(x.shape[1], 1, -1, -1).to(x), groups=x.shape[1])


def _resize(x: torch.Tensor, size: tuple[int, int], rng: random.Random) -> torch.Tensor:
    mode = rng.choice(["bilinear", "bicubic", "area"])
    kwargs = {} if mode == "area" else {"align_corners": False, "antialias": True}
    return F.interpolate(x, size=size, mode=mode, **kwargs)


def _noise(x: torch.Tensor, rng: random.Random, sigma_range, generator: torch.Generator) -> torch.Tensor:
    sigma = rng.uniform(*sigma_range) / 255.0 * 2  # images live in [-1, 1]
    gray = rng.random() < 0.4
    shape = (x.shape[0], 1, *x.shape[2:]) if gray else x.shape
    return x + sigma * torch.randn(shape, generator=generator).to(x)


def _jpeg(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    quality = rng.randint(*DegradationConfig().jpeg_quality)
    out = []
    for img in x:
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(dec).permute(2, 0, 1))
    return torch.stack(out).to(x)


def degrade(hr: torch.Tensor, scale: int, seed: int, cfg: DegradationConfig = DegradationConfig()) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, 3, H/scale, W/scale) degraded low-res, deterministic in ``seed``."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    h, w = hr.shape[-2:]
    x = hr.float()
    stages = [(cfg.blur_sigma, cfg.noise_sigma)]
    if rng.random() < cfg.second_order_prob:
        stages.append((cfg.blur_sigma_2, cfg.noise_sigma_2))
    for blur_sigma, noise_sigma in stages:
        if rng.random() < cfg.blur_prob:
            x = _blur(x, rng, blur_sigma)
        f = rng.uniform(*cfg.resize_range)
        x = _resize(x, (max(8, int(x.shape[-2] * f)), max(8, int(x.shape[-1] * f))), rng)
        if rng.random() < cfg.noise_prob:
            x = _noise(x, rng, noise_sigma, gen)
        x = _jpeg(x, rng)
    return _resize(x, (h // scale, w // scale), rng).clamp(-1, 1)
