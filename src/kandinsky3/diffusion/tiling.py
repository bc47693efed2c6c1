"""MultiDiffusion views over a large image and their uniform averaging (KandiSuperRes, spec §7.3)."""

from __future__ import annotations

import math

import torch

View = tuple[int, int, int, int]  # (top, bottom, left, right) in pixels


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def get_views(height: int, width: int, window: int = 1024, stride: int = 800) -> list[View]:
    """Row-major windows of ``window`` px every ``stride`` px; the last one in a row/column is shifted to end at the
    edge; an image smaller than the window is one view (crops are clipped to the image)."""
    return [(top, min(top + window, height), left, min(left + window, width))
            for top in _starts(height, window, stride) for left in _starts(width, window, stride)]


def crop(x: torch.Tensor, view: View) -> torch.Tensor:
    top, bottom, left, right = view
    return x[..., top:bottom, left:right]


class ViewAverager:
    """Accumulate per-view results and return their uniform average (``value / count``)."""

    def __init__(self, like: torch.Tensor):
        self.value = torch.zeros_like(like, dtype=torch.float32)
        self.count = torch.zeros_like(like[:, :1], dtype=torch.float32)

    def add(self, view: View, result: torch.Tensor):
        top, bottom, left, right = view
        self.value[..., top:bottom, left:right] += result.float()
        self.count[..., top:bottom, left:right] += 1

    def result(self) -> torch.Tensor:
        return self.value / self.count
