"""The inpainting U-Net's extra input channels, built by ONE function for training and inference (spec §3, §6).

The released 9-channel U-Net reads ``cat[x_t, keep-mask, masked-image latent]``. How the masked image is made
(every pixel whose keep value is not exactly 1 is set to 0, mid-grey in [−1, 1]) and how the mask reaches the
latent size (nearest neighbours) decide what the U-Net learns; training with anything else than what inference
feeds it silently costs quality, so both call :func:`inpainting_channels`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

REPAINT_THRESHOLD = 0.5  # a user mask value ≥ this (grey 128 of 255 and above) is repainted


def inpainting_channels(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, repaint: torch.Tensor
) -> torch.Tensor:
    """``[keep-mask, masked-image latent]`` (B, 1 + C, h, w) at latent size.

    pixels (B, 3, H, W) in [−1, 1]; repaint (B or 1, 1, H, W) in [0, 1], 1 = repaint (the user's convention);
    ``encode`` maps masked pixels to latents (the MoVQ encoder, moved to its device and dtype). Official rule:
    keep = 1 − repaint; pixels where keep ≠ 1 (any fractional edge too) are zeroed before encoding; keep is
    resized to the latent with nearest neighbours.
    """
    keep = 1.0 - repaint.float()
    masked = pixels * (keep == 1.0)
    masked_latent = encode(masked).float()
    keep_latent = latent_keep_mask(repaint, masked_latent.shape[-2:]).to(masked_latent.device)
    if keep_latent.shape[0] != masked_latent.shape[0]:
        keep_latent = keep_latent.expand(masked_latent.shape[0], -1, -1, -1)
    return torch.cat([keep_latent, masked_latent], dim=1)


def latent_keep_mask(repaint: torch.Tensor, latent_size) -> torch.Tensor:
    """The keep-mask (1 = keep) of ``repaint`` (B, 1, H, W; 1 = repaint) at latent size, by nearest neighbours:
    the latent cells the U-Net is told are known."""
    return F.interpolate(1.0 - repaint.float(), size=latent_size)


__all__ = ["REPAINT_THRESHOLD", "inpainting_channels", "latent_keep_mask"]
