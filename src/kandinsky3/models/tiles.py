"""Blended tiling: apply a function to overlapping tiles and cross-fade the seams (spec §5.4, §7.4).

Used by the MoVQ decoder (latent tiles 128, stride 96, ×8 output, 256 px blend) and the KandiSuperRes Flash
refine (latent tiles 352, stride 264, ×1, 88 latent blend).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def blend_vertical(above: torch.Tensor, below: torch.Tensor, extent: int) -> torch.Tensor:
    """Linearly cross-fade the last ``extent`` rows of ``above`` into the first rows of ``below``."""
    extent = min(above.shape[-2], below.shape[-2], extent)
    if extent == 0:
        return below
    w = torch.arange(extent, device=below.device, dtype=below.dtype)[:, None] / extent
    below = below.clone()
    below[..., :extent, :] = above[..., -extent:, :] * (1 - w) + below[..., :extent, :] * w
    return below


def blend_horizontal(left: torch.Tensor, right: torch.Tensor, extent: int) -> torch.Tensor:
    return blend_vertical(left.transpose(-1, -2), right.transpose(-1, -2), extent).transpose(-1, -2)


def tiled_map(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, stride: int, scale: int = 1
) -> torch.Tensor:
    """``fn`` on ``tile``-sized tiles every ``stride`` (input units); outputs are ``scale``× larger, blended over
    ``(tile − stride)·scale`` and cropped to ``stride·scale`` before stitching (the reference scheme)."""
    blend, keep = (tile - stride) * scale, stride * scale
    rows = [
        [fn(x[..., i : i + tile, j : j + tile]) for j in range(0, x.shape[-1], stride)]
        for i in range(0, x.shape[-2], stride)
    ]
    out_rows = []
    for r, row in enumerate(rows):
        out_row = []
        for c, t in enumerate(row):
            if r > 0:
                t = blend_vertical(rows[r - 1][c], t, blend)
            if c > 0:
                t = blend_horizontal(row[c - 1], t, blend)
            row[c] = t  # later neighbours blend against the already-blended tile, as the reference does
            out_row.append(t[..., :keep, :keep])
        out_rows.append(torch.cat(out_row, dim=-1))
    return torch.cat(out_rows, dim=-2)
