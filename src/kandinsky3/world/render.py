"""Anti-aliased rendering of scenes at any resolution, with per-object masks and boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scene import BACKGROUNDS, COLORS, SIZES, Scene, WorldObject, cell_center

SUPERSAMPLE = 4
OBJECT_RIM = 1  # px: a rendered object's anti-aliased rim lies outside its >0.5 box; a mask that removes it adds this


def grow_box(box, px: int, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) grown by ``px`` on each side, clipped to the image."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return max(0, x0 - px), max(0, y0 - px), min(width, x1 + px), min(height, y1 + px)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of 'radius' r centred at (cx, cy); None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        h = r * 1.05
        return [
            (cx, cy - h),
            (cx + h * math.sin(math.radians(60)), cy + h * 0.5 + r * 0.1),
            (cx - h * math.sin(math.radians(60)), cy + h * 0.5 + r * 0.1),
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r * 1.1 if k % 2 == 0 else r * 0.48
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def object_geometry(obj: WorldObject, side: int) -> tuple[float, float, float]:
    fx, fy = cell_center(obj.position)
    return fx * side, fy * side, SIZES[obj.size] * side


@dataclass
class Rendered:
    image: Image.Image
    masks: list[np.ndarray]  # (H, W) float coverage in [0, 1], one per object
    boxes: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) pixel boxes, one per object


def render(scene: Scene, size: int = 64) -> Rendered:
    """Draw at ``SUPERSAMPLE``× and box-filter down: clean anti-aliased edges at any ``size``."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    masks, boxes = [], []
    for obj in scene.objects:
        cx, cy, r = object_geometry(obj, big)
        draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color])
        mask = Image.new("L", (big, big), 0)
        draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, r, 255)
        small = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
        masks.append(small)
        ys, xs = np.nonzero(small > 0.5)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0))
    return Rendered(canvas.resize((size, size), Image.BOX), masks, boxes)


def outlines(scene: Scene, size: int = 64) -> np.ndarray:
    """The true outlines of a scene's visible objects: an (H, W) boolean map at ``size``, for scoring edge maps.

    Objects are drawn as labels at ``SUPERSAMPLE``× in drawing order (later objects cover earlier ones, as in
    ``render``); a sub-pixel is on an outline where its label differs from its right or lower neighbour, and a
    pixel is an outline pixel if any of its sub-pixels is. The image border is not an outline."""
    big = size * SUPERSAMPLE
    labels = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(labels)
    for index, obj in enumerate(scene.objects, start=1):
        cx, cy, r = object_geometry(obj, big)
        draw_shape(draw, obj.shape, cx, cy, r, index)
    lab = np.asarray(labels)
    edge = np.zeros((big, big), dtype=bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    return edge.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).any(axis=(1, 3))
