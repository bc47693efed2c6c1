"""Loss weighting towards the objects of a shapes-world picture.

Objects cover ≈ 8.5 % of a render's latent pixels, so a plain ε-MSE spends > 90 % of its weight on a flat
background; recipes whose signal is the objects (what a ControlNet's caption binds, what an IP-Adapter's reference
carries) can count an object's latent pixels ``object_weight`` times (``model.object_weight``)."""

from __future__ import annotations

import torch

from ..models.config import ConfigError


def check_object_weight(object_weight: float) -> None:
    """``model.object_weight`` is ≥ 1 (1: the plain ε-MSE)."""
    if object_weight < 1:
        raise ConfigError(f"model.object_weight must be ≥ 1 (1 = plain ε-MSE), got {object_weight}")


def object_coverage(images: torch.Tensor, factor: int, threshold: float = 0.1) -> torch.Tensor:
    """Share of each ``factor``×``factor`` patch (one latent pixel) that is not background, (B, 1, H/f, W/f) in
    [0, 1], for images in [-1, 1] on a plain background (the shapes world): a pixel is background when every
    channel is within ``threshold`` of the median of the image's border pixels. Works through a large dataset
    tensor 1024 images at a time (the float copies of all of them at once would double a recipe's memory)."""
    if len(images) > 1024:
        return torch.cat([object_coverage(part, factor, threshold) for part in images.split(1024)])
    x = images.float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, 4W)
    background = border.median(dim=-1).values[..., None, None]
    objects = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return torch.nn.functional.avg_pool2d(objects, factor)


def object_pixel_weight(coverage: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights: 1 on the background, ``object_weight`` on an object, normalised to mean 1 per
    image so the loss keeps its scale."""
    weight = 1 + (object_weight - 1) * coverage
    return weight / weight.mean(dim=(1, 2, 3), keepdim=True)


def batch_pixel_weight(batch: dict, factor: int, object_weight: float, device) -> torch.Tensor:
    """:func:`object_pixel_weight` of a batch: from its cached ``objects`` coverage, or from its ``image``."""
    objects = batch["objects"] if "objects" in batch else object_coverage(batch["image"], factor)
    return object_pixel_weight(objects.to(device), object_weight)


def weighted_square_error(eps: torch.Tensor, noise: torch.Tensor, batch: dict) -> torch.Tensor:
    """The per-element ε error, weighted by the batch's ``pixel_weight`` (from :func:`batch_pixel_weight`) if any."""
    error = (eps.float() - noise).square()
    return error * batch["pixel_weight"] if "pixel_weight" in batch else error


__all__ = [
    "batch_pixel_weight",
    "check_object_weight",
    "object_coverage",
    "object_pixel_weight",
    "weighted_square_error",
]
