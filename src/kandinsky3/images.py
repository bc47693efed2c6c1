"""Images and masks at the user boundary: PIL / NumPy ↔ tensors, inpainting masks, PNG metadata."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from html import escape, unescape
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin, UnidentifiedImageError

METADATA_KEY = "kandinsky3"
#: output formats by file extension; the metadata goes into a PNG text chunk, a JPEG comment or WebP XMP
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_XMP_ATTRIBUTE = "kandinsky3:settings"
_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:kandinsky3="https://github.com/ai-forever/Kandinsky-3" '
    + _XMP_ATTRIBUTE
    + '="{}"/></rdf:RDF></x:xmpmeta>'
)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, turning every way it can be unusable into one clear error.

    Missing, empty, not an image, truncated or corrupt, or a decompression bomb (more pixels than PIL's
    ``Image.MAX_IMAGE_PIXELS``): a ``FileNotFoundError`` / ``ValueError`` naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); give a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"{path} is too large to open safely (over {Image.MAX_IMAGE_PIXELS:,} pixels, a possible "
            "decompression bomb); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read; give a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0]}); re-export it") from None
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer / float grey images → 8-bit ``L`` by their value range (PIL's own ``convert``
    clips them to 255, so a 16-bit grey PNG would come out white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        return Image.fromarray((np.clip(arr, 0, 65535) / 257).round().astype(np.uint8), "L")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8), "L")
    return image


def as_pil(image) -> Image.Image:
    """Accept a PIL image, a path, an (H, W, 3) uint8 / [0,1] float array; return an RGB PIL image.

    Grey (8/16/32-bit), palette, CMYK and RGBA images are converted; an alpha channel is dropped with a warning
    (the colour under transparent pixels is what the model sees)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
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
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        warnings.warn("the input image's transparency is dropped (the model sees the colour under it)", stacklevel=2)
    image = _eight_bit(image)
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
        mask = open_image(mask)
    if isinstance(mask, Image.Image):
        mask = np.asarray(_eight_bit(mask).convert("L"), dtype=np.float32) / 255.0
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
    """The settings :func:`save_image` stored (PNG text chunk, JPEG comment or WebP XMP); ``{}`` when none."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    text = image.info.get(METADATA_KEY) or getattr(image, "text", {}).get(METADATA_KEY)
    comment = image.info.get("comment", b"")
    if not text and isinstance(comment, bytes) and comment.startswith(f"{METADATA_KEY}:".encode()):
        text = comment[len(METADATA_KEY) + 1 :].decode("utf-8")
    xmp = image.info.get("xmp", b"")
    if not text and xmp:
        xmp = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
        match = re.search(_XMP_ATTRIBUTE + '="([^"]*)"', xmp)
        text = unescape(match.group(1)) if match else None
    return json.loads(text) if text else {}


def image_format(path: str | os.PathLike) -> str:
    """The format a file name asks for (``IMAGE_FORMATS``); an unknown extension is a clear error."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(
            f"cannot write {Path(path).name}: unknown image extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def save_image(image: Image.Image, path: str | os.PathLike):
    """Save in the format of the extension (PNG, JPEG quality 95, lossless WebP) with the generation settings
    (prompt, seed, …): a PNG text chunk, a JPEG comment or WebP XMP (:func:`read_metadata` reads all three).

    Written to a temporary file of its own in the same folder, flushed, then renamed over ``path``: a reader (or a
    concurrent writer of the same path) sees either a complete old file or a complete new one, never a mix."""
    path = Path(path)
    fmt = image_format(path)
    info = PngImagePlugin.PngInfo()
    text = image.info.get(METADATA_KEY)
    if text is not None:
        info.add_text(METADATA_KEY, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "PNG":
                image.save(f, format="PNG", pnginfo=info)
            elif fmt == "JPEG":
                comment = b"" if text is None else f"{METADATA_KEY}:{text}".encode()
                image.convert("RGB").save(f, format="JPEG", quality=95, comment=comment)
            else:
                xmp = b"" if text is None else _XMP.format(escape(text, quote=True)).encode()
                image.save(f, format="WEBP", lossless=True, xmp=xmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; pictures are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
