"""One small builder per task: what the sampler starts from, and the extra U-Net input channels.

Every task (text→image, image→image, inpainting, outpainting) is the same sampling loop over the same U-Net;
these functions only prepare its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import as_mask, as_pil, check_size, fit_for_diffusion, pil_to_tensor


@dataclass
class Start:
    """Latent shape (B, C, h, w); for image→image also the clean latent and the strength."""

    shape: tuple[int, int, int, int]
    latents: torch.Tensor | None = None
    strength: float = 1.0


def text_to_image(batch: int, width: int, height: int, latent_channels: int, factor: int) -> Start:
    return Start((batch, latent_channels, height // factor, width // factor))


def prepare_image(image, width: int | None, height: int | None, max_side: int, multiple: int) -> Image.Image:
    """Resize to the requested size, or (official) to ≈ max_side² pixels with sides floored to ``multiple``."""
    image = as_pil(image)
    if width is None and height is None:
        width, height = fit_for_diffusion(image.width, image.height, max_side, multiple)
    else:
        width, height = width or image.width, height or image.height
        check_size(width, height, multiple)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC, reducing_gap=None)
    return image


def image_to_image(latents: torch.Tensor, batch: int, strength: float) -> Start:
    latents = latents.expand(batch, -1, -1, -1)
    return Start(tuple(latents.shape), latents, strength)


def inpainting_inputs(movq, image: Image.Image, mask: np.ndarray, batch: int) -> torch.Tensor:
    """Extra channels ``[mask (1 = keep), masked-image latent]`` at latent size (spec §6).

    ``mask`` is the user's (1 = repaint) at image size; pixels where the keep-mask is not exactly 1 are zeroed
    (mid-grey) before encoding, and the mask is resized to the latent with nearest neighbours.
    """
    param = next(movq.parameters())
    keep = 1.0 - torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    pixels = pil_to_tensor(image)
    masked = pixels * (keep == 1.0)
    masked_latent = movq.encode(masked.to(param.device, param.dtype)).float()
    keep_latent = F.interpolate(keep, size=masked_latent.shape[-2:]).to(masked_latent.device)
    extra = torch.cat([keep_latent, masked_latent], dim=1)
    return extra.expand(batch, -1, -1, -1)


def resize_mask(mask, image_size: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """Check the mask against the original image size, then resize it (bilinear, like skimage) to ``target``."""
    m = as_mask(mask, image_size)
    if m.shape[::-1] != tuple(target):
        t = torch.from_numpy(m)[None, None]
        m = F.interpolate(t, size=(target[1], target[0]), mode="bilinear", align_corners=False)[0, 0].numpy()
    return m


def outpaint_canvas(image, left: int, right: int, top: int, bottom: int, multiple: int) -> tuple[Image.Image, np.ndarray]:
    """Extend the canvas by the given margins (rounded up so each side is a multiple of ``multiple``).

    The new border is filled by edge replication (a neutral start for the masked latent) and marked 1 (repaint)
    in the returned mask; the original pixels are marked 0 (keep).
    """
    image = as_pil(image)
    if min(left, right, top, bottom) < 0 or left + right + top + bottom == 0:
        raise ValueError("outpainting needs non-negative margins, at least one of them positive")
    w, h = image.width + left + right, image.height + top + bottom
    extra_w, extra_h = (-w) % multiple, (-h) % multiple
    right, bottom = right + extra_w, bottom + extra_h
    arr = np.asarray(image)
    padded = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones(padded.shape[:2], dtype=np.float32)
    mask[top:top + image.height, left:left + image.width] = 0.0
    return Image.fromarray(padded), mask
