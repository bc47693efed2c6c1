"""``extract_edges``: a PIL picture → its edge map as a PIL picture (three equal channels), by either method."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..images import as_pil
from .hed import hed_edges, load_hed, safe_step
from .soft import soft_edges

EDGE_METHODS = ("soft", "hed")
_HED_CACHE: dict[str, object] = {}


def image_to_unit(image: Image.Image) -> torch.Tensor:
    """PIL (any mode; grey, palette, RGBA converted) → (1, 3, H, W) float32 in [0, 1]."""
    arr = np.asarray(as_pil(image), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def edges_to_image(edges: torch.Tensor) -> Image.Image:
    """(1, 1, H, W) or (H, W) in [0, 1] → an RGB PIL image with three equal channels (rounded to 8 bits)."""
    arr = (edges.detach().float().reshape(edges.shape[-2:]).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.stack([arr] * 3, axis=-1), "RGB")


def _hed_model(hed_weights: str | os.PathLike | None):
    key = str(hed_weights)
    if key not in _HED_CACHE:
        _HED_CACHE.clear()  # keep one network (about 56 MB) in memory, not one per file ever used
        _HED_CACHE[key] = load_hed(hed_weights)
    return _HED_CACHE[key]


def extract_edges(
    image: Image.Image,
    method: str = "soft",
    hed_weights: str | os.PathLike | None = None,
    safe: bool = False,
) -> Image.Image:
    """An edge map of ``image``: RGB, three equal channels, the same size; white edges on black.

    method ``"soft"``: the classical extractor (no network, no download); ``"hed"``: the HED network with
    ``hed_weights`` (a ``ControlNetHED.pth`` / ``.safetensors`` file or a hub id; default
    ``lllyasviel/Annotators/ControlNetHED.pth`` through the hub cache). ``safe``: safe-step quantisation (0, ½, 1).
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"unknown edge method {method!r}; choose one of {', '.join(EDGE_METHODS)}")
    if method == "soft" and hed_weights is not None:
        raise ValueError("hed_weights is only used by method='hed'; drop it or choose method='hed'")
    pixels = image_to_unit(image)
    edges = soft_edges(pixels) if method == "soft" else hed_edges(_hed_model(hed_weights), pixels)
    if safe:
        edges = safe_step(edges)
    return edges_to_image(edges)
