"""Edge extractors vs the renderer's true object outlines: precision, recall and F-score at a pixel tolerance.

A predicted edge pixel is correct if a true outline pixel lies within ``tolerance`` pixels of it (a
(2·tol+1)² square), and a true outline pixel is found if a predicted edge pixel lies within ``tolerance`` of it;
counts are summed over all images before dividing (one dataset-wide threshold, BSDS's "ODS"). Soft maps are a few
pixels wide, so each method is scored as thresholded and also thinned to its local maxima across the edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def _dilate(maps: torch.Tensor, tolerance: int) -> torch.Tensor:
    if tolerance == 0:
        return maps
    return F.max_pool2d(maps.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0


def match_counts(pred: torch.Tensor, truth: torch.Tensor, tolerance: int = 1) -> tuple[int, int, int, int]:
    """(correct predicted pixels, predicted pixels, found outline pixels, outline pixels) of boolean (B, 1, H, W)
    maps."""
    pred, truth = pred.bool(), truth.bool()
    correct = int((pred & _dilate(truth, tolerance)).sum())
    found = int((truth & _dilate(pred, tolerance)).sum())
    return correct, int(pred.sum()), found, int(truth.sum())


def thin(edges: torch.Tensor) -> torch.Tensor:
    """Keep the local maxima of a soft (B, 1, H, W) map across the edge (a cheap non-maximum suppression): a pixel
    stays if it is not below either neighbour along the map's steeper axis (horizontal or vertical)."""
    p = F.pad(edges, (1, 1, 1, 1), mode="replicate")
    centre, left, right = p[..., 1:-1, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]
    up, down = p[..., :-2, 1:-1], p[..., 2:, 1:-1]
    horizontal = (right - left).abs() >= (down - up).abs()
    keep = torch.where(horizontal, (centre >= left) & (centre >= right), (centre >= up) & (centre >= down))
    return torch.where(keep, edges, torch.zeros_like(edges))


@dataclass
class EdgeScore:
    method: str
    size: int
    noise: float
    thinned: bool
    threshold: float
    precision: float
    recall: float
    f: float
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


def _f(correct, predicted, found, total) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = found / total if total else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def world_edges_data(num: int, size: int = 64, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` scenes of a world split: renders (num, 3, size, size) in [0, 1] and their true outlines (bool)."""
    from ..world import render, world_sample
    from ..world.render import outlines

    images, truths = [], []
    for i in range(num):
        scene = world_sample(i, split, 8).scene  # the scene only; rendered below at ``size``
        images.append(np.asarray(render(scene, size).image, dtype=np.float32) / 255.0)
        truths.append(outlines(scene, size))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.stack(truths))[:, None]


def score_edges(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    truths: torch.Tensor,
    method: str,
    noise: float = 0.0,
    tolerance: int = 1,
    thresholds=THRESHOLDS,
    batch_size: int = 64,
) -> list[EdgeScore]:
    """The best dataset-wide threshold of ``extractor`` ((B, 3, H, W) in [0, 1] → (B, 1, H, W) in [0, 1]), as
    thresholded and as thinned maps."""
    counts = {(th, t): np.zeros(4, dtype=np.int64) for th in (False, True) for t in thresholds}
    for start in range(0, len(images), batch_size):
        edges = extractor(images[start : start + batch_size]).float()
        truth = truths[start : start + batch_size]
        for thinned, maps in ((False, edges), (True, thin(edges))):
            for t in thresholds:
                counts[(thinned, t)] += match_counts(maps > t, truth, tolerance)
    scores = []
    for thinned in (False, True):
        best = max(thresholds, key=lambda t: _f(*counts[(thinned, t)])[2])
        p, r, f = _f(*counts[(thinned, best)])
        scores.append(EdgeScore(method, images.shape[-1], noise, thinned, best, p, r, f, len(images)))
    return scores


def edge_extractors(hed_weights=None) -> dict[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The methods scored: the soft extractor, its unblurred Sobel core, and HED (None without weights)."""
    from ..edges import hed_edges, load_hed, soft_edges

    methods = {"soft": soft_edges, "sobel (soft, σ=0)": lambda x: soft_edges(x, sigma=0.0)}
    if hed_weights is None:
        methods["hed"] = None
    else:
        model = load_hed(hed_weights)
        methods["hed"] = lambda x: hed_edges(model, x)
    return methods


def with_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Renders with seeded Gaussian pixel noise (a stand-in for sensor / compression noise), clipped to [0, 1]."""
    if sigma == 0:
        return images
    generator = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def evaluate_edges(
    num: int = 300,
    sizes=(64, 256),
    noises=(0.0, 0.1),
    hed_weights=None,
    tolerance: int = 1,
    progress: bool = True,
) -> list[EdgeScore | str]:
    """Every method on ``num`` held-out (test-split) scenes at each size, clean and with pixel noise."""
    from tqdm.auto import tqdm

    methods = edge_extractors(hed_weights)
    rows: list[EdgeScore | str] = []
    if methods["hed"] is None:
        rows.append("hed: needs the downloaded weights (--hed-weights ControlNetHED.pth); not scored")
    runs = [(size, noise, name) for size in sizes for noise in noises for name in methods if methods[name]]
    data = {}
    for size, noise, name in tqdm(runs, desc="edge F-scores", disable=not progress):
        if size not in data:
            data[size] = world_edges_data(num, size)
        images, truths = data[size]
        rows.extend(score_edges(methods[name], with_noise(images, noise), truths, name, noise, tolerance))
    return rows


def format_table(rows: list[EdgeScore | str], tolerance: int = 1) -> str:
    lines = [
        f"edge maps vs the renderer's true outlines (F-score at {tolerance}-px tolerance, best dataset-wide threshold)",
        f"{'method':<18} {'size':>5} {'noise σ':>7}  {'maps':<11} {'threshold':>9} {'precision':>9} {'recall':>7} "
        f"{'F':>6}",
    ]
    notes = []
    for row in rows:
        if isinstance(row, str):
            notes.append(row)
            continue
        maps = "thinned" if row.thinned else "thresholded"
        lines.append(
            f"{row.method:<18} {row.size:>5} {row.noise:>7.2f}  {maps:<11} {row.threshold:>9.2f} {row.precision:>9.3f} "
            f"{row.recall:>7.3f} {row.f:>6.3f}"
        )
    return "\n".join(notes + lines)
