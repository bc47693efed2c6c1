"""Training masks for inpainting (1 = repaint): the Kandinsky 3.1 mixture of object-box masks and random masks.

Kinds (:data:`KINDS`):

- ``box`` — (a) an object's box, each side pushed out by a random share of the free margin on that side (or, for
  a ``tight`` share of them, the object's own box plus its 1-px anti-aliased rim: a detection box as it is);
- ``shape`` — (b) an irregular closed curve (a random polygon smoothed into a quadratic B-spline, i.e. chained
  Bézier arcs) around the object, clipped to the extended box of (a);
- ``random`` — (c) LaMa-style free-form brush strokes plus a few rectangles, blind to the objects (Kandinsky 3.0);
- ``whole`` — (d) the whole image (the model must also work as text→image).

Box-based masks (a, b) are prompted with the object's region caption, the others with the whole-image caption
(the recipe decides). With no object boxes (a plain caption folder, or the random-mask ablation) the box shares
go to ``random``. Every draw takes a ``numpy.random.Generator`` (or a torch generator, from which one is seeded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..world.render import OBJECT_RIM, grow_box

KINDS = ("box", "shape", "random", "whole")


@dataclass
class MaskMixture:
    """``model.masks:`` — the share of each kind (normalised) and the shape parameters, relative to the image side."""

    box: float = 0.25
    shape: float = 0.25
    random: float = 0.45
    whole: float = 0.05
    extend_max: float = 0.5  # (a) each side moves out by U(0, extend_max) × its free margin
    tight: float = 0.0  # (a) share of box masks that are the object's box + OBJECT_RIM, not extended
    small_bias: float = 0.0  # (a, b) the object is drawn with probability ∝ box area^−small_bias (0: uniform)
    strokes: tuple[int, int] = (1, 4)  # (c) number of brush strokes (inclusive range)
    stroke_vertices: tuple[int, int] = (2, 6)
    stroke_width: tuple[float, float] = (0.06, 0.2)  # of the image side
    stroke_step: tuple[float, float] = (0.1, 0.35)  # length of one stroke segment, of the image side
    rectangles: tuple[int, int] = (0, 2)
    rectangle_side: tuple[float, float] = (0.15, 0.5)

    def validate(self, where: str = "model.masks"):
        from ..models.config import ConfigError

        weights = self.weights()
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"{where}: box, shape, random, whole are shares ≥ 0 with a positive sum, got {weights}")
        if not 0 <= self.extend_max <= 1:
            raise ConfigError(f"{where}.extend_max must be in [0, 1], got {self.extend_max}")
        if not 0 <= self.tight <= 1:
            raise ConfigError(f"{where}.tight is a share in [0, 1], got {self.tight}")
        if self.small_bias < 0:
            raise ConfigError(f"{where}.small_bias is an exponent ≥ 0 (0: every object alike), got {self.small_bias}")
        for name in ("strokes", "stroke_vertices", "stroke_width", "stroke_step", "rectangles", "rectangle_side"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi < lo:
                raise ConfigError(f"{where}.{name} must be a range [low, high] with 0 ≤ low ≤ high, got {[lo, hi]}")
        if self.strokes[1] + self.rectangles[1] == 0:
            raise ConfigError(f"{where}: random masks need strokes or rectangles (both ranges are 0)")

    def weights(self) -> tuple[float, float, float, float]:
        return (self.box, self.shape, self.random, self.whole)


@dataclass
class SampledMask:
    mask: np.ndarray  # (H, W) float32, exactly 0 / 1, 1 = repaint
    kind: str
    object_index: int | None  # the object a box-based mask was drawn around

    @property
    def coverage(self) -> float:
        return float(self.mask.mean())


def as_numpy_generator(generator) -> np.random.Generator:
    """A numpy generator; a torch generator seeds a fresh one (so a run's torch stream stays the one source)."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device).item())
        return np.random.default_rng(seed)
    if generator is None or isinstance(generator, int):
        return np.random.default_rng(generator)
    raise TypeError(f"a numpy or torch generator (or a seed), got {type(generator).__name__}")


def extend_box(box, width: int, height: int, fraction_max: float, rng: np.random.Generator) -> tuple[int, ...]:
    """(a): each side of ``box`` (x0, y0, x1, y1) pushed out by U(0, fraction_max) of the free margin on its side."""
    x0, y0, x1, y1 = box
    u = rng.uniform(0.0, fraction_max, 4)
    return (
        int(math.floor(x0 - u[0] * x0)),
        int(math.floor(y0 - u[1] * y0)),
        int(math.ceil(x1 + u[2] * (width - x1))),
        int(math.ceil(y1 + u[3] * (height - y1))),
    )


def _box_mask(box, width: int, height: int) -> np.ndarray:
    m = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)] = 1.0
    return m


def _smooth_closed(points: np.ndarray, passes: int = 3) -> np.ndarray:
    """Chaikin corner cutting: converges to the closed quadratic B-spline (chained Bézier arcs) of the polygon."""
    for _ in range(passes):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


def _draw(width: int, height: int, paint) -> np.ndarray:
    """Draw at 1× with PIL (``paint(draw)``) → 0/1 float mask."""
    canvas = Image.new("L", (width, height), 0)
    paint(ImageDraw.Draw(canvas))
    return (np.asarray(canvas) > 127).astype(np.float32)


def irregular_mask(box, extended, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(b): a smooth random blob around ``box``'s centre that reaches past its corners (radius between the box's
    circumscribed ellipse and the extended box's), clipped to ``extended``."""
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = extended
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    n = int(rng.integers(8, 13))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * math.pi / n) + rng.uniform(0, 2 * math.pi)
    gap = float(np.max(np.diff(np.append(angles, angles[0] + 2 * math.pi))))
    reach = 1.0 / math.cos(min(gap / 2, 1.2))  # chords (and the smoothing inside them) stay outside the ellipse
    inner_a, inner_b = reach * (x1 - x0) / math.sqrt(2), reach * (y1 - y0) / math.sqrt(2)
    points = []
    for a in angles:
        c, s = math.cos(a), math.sin(a)
        r_in = 1.0 / math.sqrt((c / max(inner_a, 0.5)) ** 2 + (s / max(inner_b, 0.5)) ** 2)
        # distance from the centre to the extended box along this ray
        r_out = min(
            ((ex1 - cx) / c) if c > 1e-6 else ((ex0 - cx) / c) if c < -1e-6 else math.inf,
            ((ey1 - cy) / s) if s > 1e-6 else ((ey0 - cy) / s) if s < -1e-6 else math.inf,
        )
        r = r_in + rng.uniform(0.0, 1.0) * max(0.0, r_out - r_in)
        points.append((cx + r * c, cy + r * s))
    curve = _smooth_closed(np.asarray(points))
    m = _draw(width, height, lambda d: d.polygon([tuple(p) for p in curve], fill=255))
    return m * _box_mask(extended, width, height)


def random_mask(width: int, height: int, mix: MaskMixture, rng: np.random.Generator) -> np.ndarray:
    """(c): LaMa-style free-form strokes (random walks with round joints) plus a few axis-aligned rectangles."""
    side = min(width, height)

    def paint(draw):
        n_strokes = int(rng.integers(mix.strokes[0], mix.strokes[1] + 1))
        n_rects = int(rng.integers(mix.rectangles[0], mix.rectangles[1] + 1))
        if n_strokes + n_rects == 0:
            n_strokes = 1
        for _ in range(n_strokes):
            w = max(1, int(round(rng.uniform(*mix.stroke_width) * side)))
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            angle = rng.uniform(0, 2 * math.pi)
            points = [(x, y)]
            for _ in range(int(rng.integers(mix.stroke_vertices[0], mix.stroke_vertices[1] + 1)) - 1):
                angle += rng.uniform(-math.pi / 2, math.pi / 2)
                step = rng.uniform(*mix.stroke_step) * side
                x = float(np.clip(x + step * math.cos(angle), 0, width - 1))
                y = float(np.clip(y + step * math.sin(angle), 0, height - 1))
                points.append((x, y))
            if len(points) > 1:
                draw.line(points, fill=255, width=w, joint="curve")
            for px, py in points:  # round caps
                draw.ellipse([px - w / 2, py - w / 2, px + w / 2, py + w / 2], fill=255)
        for _ in range(n_rects):
            rw, rh = (rng.uniform(*mix.rectangle_side, 2) * (width, height)).astype(int)
            rx, ry = int(rng.integers(0, max(1, width - rw + 1))), int(rng.integers(0, max(1, height - rh + 1)))
            draw.rectangle([rx, ry, rx + rw - 1, ry + rh - 1], fill=255)

    return _draw(width, height, paint)


class MaskSampler:
    """Draws training masks from a :class:`MaskMixture`."""

    def __init__(self, mixture: MaskMixture | None = None):
        self.mixture = mixture or MaskMixture()
        self.mixture.validate()

    def probabilities(self, has_boxes: bool) -> np.ndarray:
        w = np.asarray(self.mixture.weights(), dtype=np.float64)
        if not has_boxes:  # box-based shares fall back to random masks
            w = np.array([0.0, 0.0, w[0] + w[1] + w[2], w[3]])
        return w / w.sum()

    def sample(self, width: int, height: int, boxes=(), generator=None) -> SampledMask:
        """One mask for an image of ``width`` × ``height`` whose objects have pixel ``boxes`` (x0, y0, x1, y1)."""
        rng = as_numpy_generator(generator)
        usable = [i for i, b in enumerate(boxes) if b[2] > b[0] and b[3] > b[1]]  # indices into ``boxes``
        kind = KINDS[int(rng.choice(len(KINDS), p=self.probabilities(bool(usable))))]
        if kind == "whole":
            return SampledMask(np.ones((height, width), np.float32), kind, None)
        if kind == "random":
            return SampledMask(random_mask(width, height, self.mixture, rng), kind, None)
        index = usable[self._object_choice([boxes[i] for i in usable], rng)]
        extended = extend_box(boxes[index], width, height, self.mixture.extend_max, rng)
        if kind == "box":
            if self.mixture.tight and rng.uniform() < self.mixture.tight:  # no draw when 0: old seeds keep their masks
                extended = grow_box(boxes[index], OBJECT_RIM, width, height)
            return SampledMask(_box_mask(extended, width, height), kind, index)
        return SampledMask(irregular_mask(boxes[index], extended, width, height, rng), kind, index)

    def _object_choice(self, boxes, rng: np.random.Generator) -> int:
        """Which of ``boxes`` the box-based mask is drawn around: uniform, or biased toward small objects, whose
        few latent cells are the hardest holes to fill (docs/inpainting.md, stage 9)."""
        if not self.mixture.small_bias:  # the uniform draw as before: old seeds keep their masks
            return int(rng.integers(len(boxes)))
        areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=np.float64)
        weights = areas**-self.mixture.small_bias
        return int(rng.choice(len(boxes), p=weights / weights.sum()))


__all__ = [
    "KINDS",
    "MaskMixture",
    "MaskSampler",
    "SampledMask",
    "as_numpy_generator",
    "extend_box",
    "irregular_mask",
    "random_mask",
]
