"""Images and masks at the user boundary: PIL / NumPy ↔ tensors, inpainting masks, PNG metadata."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

METADATA_KEY = "kandinsky3"


def as_pil(image) -> Image.Image:
    """Accept a PIL image, a path, an (H, W, 3) uint8 / [0,1] float array; return an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        image = Image.open(path)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a path or an (H, W, 3) array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError("the image is empty (zero width or height)")
    return image.convert("RGB") if image.mode != "RGB" else image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL → (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(as_pil(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


PIXEL_ROUNDING = ("truncate", "round")


def tensor_to_pil(images: torch.Tensor, rounding: str = "truncate") -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images via clip((x+1)/2, 0, 1)·255.

    ``truncate`` (default) is the official K3 conversion (torchvision ``ToPILImage`` on a float tensor:
    ``mul(255).byte()``), so PNGs match the official code bit for bit; ``round`` rounds to the nearest level
    (diffusers' ``numpy_to_pil``), on average ½ level brighter."""
    if rounding not in PIXEL_ROUNDING:
        raise ValueError(f"pixel rounding must be one of {PIXEL_ROUNDING}, got {rounding!r}")
    scaled = ((images.float() + 1) / 2).clamp(0, 1) * 255
    arr = (scaled.round() if rounding == "round" else scaled).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def check_size(width: int, height: int, multiple: int):
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"{name} {value} is not a positive multiple of {multiple}; use {lower} or {lower + multiple}"
            )


def fit_for_diffusion(width: int, height: int, max_side_pixels: int, multiple: int) -> tuple[int, int]:
    """The official ``resize_image_for_diffusion``: shrink to ≈ max_side² pixels, floor each side to ``multiple``."""
    rf = max(1.0, math.sqrt(width * height / max_side_pixels**2))
    return max(multiple, (round(width / rf) // multiple) * multiple), max(
        multiple, (round(height / rf) // multiple) * multiple
    )


def as_mask(mask, size: tuple[int, int]) -> np.ndarray:
    """A user mask (1 / white = repaint) → float (H, W) array in [0, 1]; it must be exactly ``size`` (W, H)."""
    if isinstance(mask, (str, os.PathLike)):
        mask = Image.open(mask)
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().float().cpu().numpy()
    mask = np.asarray(mask, dtype=np.float32)
    mask = mask.squeeze()
    if mask.ndim != 2:
        raise ValueError(f"the mask must be one channel (H, W), got shape {mask.shape}")
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise ValueError(
            f"mask size {mask.shape[1]}x{mask.shape[0]} does not match the image size {size[0]}x{size[1]}; "
            "give a mask of the image's exact width and height"
        )
    if mask.max() > 1.0:
        mask = mask / 255.0
    return mask


_DILATION_KERNEL = (
    torch.tensor(
        [[1, 1, 1, 1, 1], [1, 5, 5, 5, 1], [1, 5, 44, 5, 1], [1, 5, 5, 5, 1], [1, 1, 1, 1, 1]], dtype=torch.float32
    )
    / 100
)


def dilate_mask(mask: np.ndarray, passes: int = 3) -> np.ndarray:
    """The official ``prepare_mask``: convolve 3× with the 5×5 kernel, keep > 0 (grows the region ≈2 px a pass)."""
    x = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    for _ in range(passes):
        x = F.conv2d(x, _DILATION_KERNEL[None, None], padding=2)
    return (x[0, 0] > 0).numpy().astype(np.float32)


def with_metadata(image: Image.Image, metadata: dict) -> Image.Image:
    image.info[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    return image


def read_metadata(image: Image.Image | str | os.PathLike) -> dict:
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    text = image.info.get(METADATA_KEY) or getattr(image, "text", {}).get(METADATA_KEY)
    return json.loads(text) if text else {}


def save_image(image: Image.Image, path: str | os.PathLike):
    """Save as PNG with the generation settings (prompt, seed, …) in a text chunk.

    Written to a temporary file of its own in the same folder, flushed, then renamed over ``path``: a reader (or a
    concurrent writer of the same path) sees either a complete old file or a complete new one, never a mix."""
    info = PngImagePlugin.PngInfo()
    if METADATA_KEY in image.info:
        info.add_text(METADATA_KEY, image.info[METADATA_KEY])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
