"""A judge that reads an image and a caption and says which stated attributes hold.

Segment by nearest palette colour, keep each colour's largest connected region, then read position from its
centroid (3×3 grid) and shape + size by matching rendered templates (best IoU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from .captions import ParsedCaption, Stated, parse_caption
from .render import render
from .scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, WorldObject

_NAMES = list(BACKGROUNDS)
_PALETTE = np.array([BACKGROUNDS[n] for n in _NAMES], dtype=np.float32)
MAX_COLOR_DISTANCE = 70.0
MIN_AREA_FRACTION = 0.25  # of the smallest object's area
CORE_ATTRIBUTES = ("color", "shape", "position")  # the alignment criterion (size is judged but not required)


@dataclass
class ObjectVerdict:
    stated: Stated
    color: bool | None
    shape: bool | None
    size: bool | None
    position: bool | None

    @property
    def core_ok(self) -> bool:
        """Colour, shape and position: every one stated is right."""
        return all(getattr(self, a) is not False for a in CORE_ATTRIBUTES)


@dataclass
class Verdict:
    objects: list[ObjectVerdict]
    background: bool | None

    @property
    def aligned(self) -> bool:
        """All stated colours, shapes and positions hold (the alignment criterion)."""
        return bool(self.objects) and all(o.core_ok for o in self.objects)


def _labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(image[:, :, None, :] - _PALETTE[None, None], axis=-1)
    return d.argmin(-1), d.min(-1)


@lru_cache(maxsize=512)
def _template(shape: str, size: str, position: str, side: int) -> np.ndarray:
    scene = Scene("gray", (WorldObject("red", shape, size, position),))
    return render(scene, side).masks[0] > 0.5


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


def _match_shape(component: np.ndarray, position: str) -> tuple[str, str, float]:
    """Best (shape, size) by IoU of centroid-aligned templates."""
    side = component.shape[0]
    cy, cx = ndimage.center_of_mass(component)
    best = ("", "", -1.0)
    for shape in SHAPES:
        for size in SIZES:
            t = _template(shape, size, position, side)
            ty, tx = ndimage.center_of_mass(t)
            t = _shift(t, int(round(cy - ty)), int(round(cx - tx)))
            iou = (t & component).sum() / max(1, (t | component).sum())
            if iou > best[2]:
                best = (shape, size, iou)
    return best


def _position(component: np.ndarray) -> str:
    side_y, side_x = component.shape
    cy, cx = ndimage.center_of_mass(component)
    col = min(2, int(cx * 3 / side_x))
    row = min(2, int(cy * 3 / side_y))
    return POSITIONS[row * 3 + col]


def _largest_region(mask: np.ndarray) -> np.ndarray | None:
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _colour_regions(image: Image.Image) -> tuple[str, dict[str, np.ndarray]]:
    """The background colour (the border's commonest palette colour) and, for every other palette colour that
    covers at least the minimum area, its largest connected region — what both the judge and the detector read."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = arr.shape[0]
    labels, dist = _labels(arr)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = _NAMES[np.bincount(border, minlength=len(_NAMES)).argmax()]
    min_area = MIN_AREA_FRACTION * np.pi * (SIZES["small"] * side) ** 2 * 0.5
    regions: dict[str, np.ndarray] = {}
    for i, name in enumerate(_NAMES):
        if name == background or name not in COLORS:
            continue
        region = _largest_region((labels == i) & (dist < MAX_COLOR_DISTANCE))
        if region is not None and region.sum() >= min_area:
            regions[name] = region
    return background, regions


def judge(image: Image.Image, caption: str | ParsedCaption) -> Verdict:
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    background, regions = _colour_regions(image)

    verdicts = []
    for stated in parsed.objects:
        candidates = [stated.color] if stated.color else list(regions)
        best = None
        for color in candidates:
            region = regions.get(color)
            if region is None:
                continue
            position = _position(region)
            shape, size, _ = _match_shape(region, position)
            v = ObjectVerdict(
                stated,
                True if stated.color else None,
                None if stated.shape is None else shape == stated.shape,
                None if stated.size is None else size == stated.size,
                None if stated.position is None else position == stated.position,
            )
            score = sum(x is True for x in (v.shape, v.size, v.position))
            if best is None or score > best[0]:
                best = (score, v)
        if best is None:
            verdicts.append(
                ObjectVerdict(
                    stated,
                    False if stated.color else None,
                    None if stated.shape is None else False,
                    None if stated.size is None else False,
                    None if stated.position is None else False,
                )
            )
        else:
            verdicts.append(best[1])
    bg_ok = None if parsed.background is None else parsed.background == background
    return Verdict(verdicts, bg_ok)


@dataclass
class Detection:
    """An object the judge finds without a caption: its pixel box (x0, y0, x1, y1), colour, shape, size and the
    IoU of its best template as a confidence score."""

    box: tuple[int, int, int, int]
    color: str
    shape: str
    size: str
    score: float

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


def detect(image: Image.Image) -> list[Detection]:
    """The judge as an object detector: every palette colour other than the background's that covers at least
    the judge's minimum area is one object (its largest connected region), read as the best-matching shape."""
    found = []
    for name, region in _colour_regions(image)[1].items():
        ys, xs = np.nonzero(region)
        shape, size, iou = _match_shape(region, _position(region))
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        found.append(Detection(box, name, shape, size, float(iou)))
    return found
