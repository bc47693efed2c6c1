"""MultiDiffusion views over a large image and their averaging (KandiSuperRes, spec §7.3).

The official averaging is uniform. A view's prediction is worst near its own edges (its convolutions see zero
padding there, not the neighbouring content), so uniform averaging lets that edge error show as a step where
one view ends inside another. ``blend="ramp"`` weights each view linearly down to ~0 over the overlap at the
edges that lie inside the image (edges on the image border keep full weight), which removes the step.
"""

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
    return [
        (top, min(top + window, height), left, min(left + window, width))
        for top in _starts(height, window, stride)
        for left in _starts(width, window, stride)
    ]


def crop(x: torch.Tensor, view: View) -> torch.Tensor:
    top, bottom, left, right = view
    return x[..., top:bottom, left:right]


BLENDS = ("uniform", "ramp")


def edge_ramp(length: int, fade_start: bool, fade_end: bool, width: int) -> torch.Tensor:
    """1-D view weights: 1 inside, falling linearly to 1/(width+1) over ``width`` px at a fading edge."""
    w = torch.ones(length)
    if width > 0:
        ramp = torch.arange(1, min(width, length) + 1, dtype=torch.float32) / (width + 1)
        if fade_start:
            w[: len(ramp)] = torch.minimum(w[: len(ramp)], ramp)
        if fade_end:
            w[length - len(ramp) :] = torch.minimum(w[length - len(ramp) :], ramp.flip(0))
    return w


class ViewAverager:
    """Accumulate per-view results and return their weighted average (``value / weight``).

    ``blend="uniform"`` is the official plain average; ``"ramp"`` fades views out over ``ramp`` px at inner edges.
    """

    def __init__(self, like: torch.Tensor, blend: str = "uniform", ramp: int = 0):
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.value = torch.zeros_like(like, dtype=torch.float32)
        self.count = torch.zeros_like(like[:, :1], dtype=torch.float32)
        self.ramp = ramp if blend == "ramp" else 0

    def weights(self, view: View) -> torch.Tensor:
        top, bottom, left, right = view
        height, width = self.count.shape[-2:]
        rows = edge_ramp(bottom - top, top > 0, bottom < height, self.ramp)
        cols = edge_ramp(right - left, left > 0, right < width, self.ramp)
        return (rows[:, None] * cols[None, :]).to(self.count.device)

    def add(self, view: View, result: torch.Tensor):
        top, bottom, left, right = view
        w = self.weights(view)
        self.value[..., top:bottom, left:right] += result.float() * w
        self.count[..., top:bottom, left:right] += w

    def result(self) -> torch.Tensor:
        return self.value / self.count


class MultiDiffusion:
    """A denoiser over a canvas made of overlapping views (KandiSuperRes, spec §7.3): each batch of views is denoised
    by ``denoiser.crop(views)`` and the per-view predictions are averaged (``blend``) into one canvas prediction.

    Averaging the predictions and taking one solver step on the canvas is the official rule of stepping every view
    with its own solver and averaging the stepped views: a DDIM/DPM-Solver step is linear in (x_t, the prediction
    history) with coefficients shared by all views, and the view weights sum to one (parity test to fp32 rounding).
    The canvas has batch 1.
    """

    def __init__(self, denoiser, height: int, width: int, window: int, stride: int, view_batch_size: int, blend: str):
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.denoiser, self.blend = denoiser, blend
        self.views = get_views(height, width, window, stride) if window else [(0, height, 0, width)]
        self.batches = [self.views[i : i + view_batch_size] for i in range(0, len(self.views), view_batch_size)]
        self.ramp = max(0, window - stride) if window else 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        average = ViewAverager(x, self.blend, ramp=self.ramp)
        for batch in self.batches:
            prediction = self.denoiser.crop(batch)(torch.cat([crop(x, v) for v in batch]), t)
            for view, result in zip(batch, prediction.split(1)):
                average.add(view, result)
        return average.result()
