"""The shapes world: a seeded generator of scenes (1–3 coloured shapes on a 3×3 grid over a plain background)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**COLORS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.10, "large": 0.155}  # radius as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# colour + shape pairs never drawn in training scenes: measure compositional generalisation on them
HELD_OUT_PAIRS = frozenset({("green", "star"), ("purple", "triangle"), ("orange", "square"), ("blue", "circle")})


def cell_center(position: str) -> tuple[float, float]:
    """(x, y) centre of a grid cell as fractions of the image side."""
    index = POSITIONS.index(position)
    return ((index % 3) * 2 + 1) / 6, ((index // 3) * 2 + 1) / 6


@dataclass(frozen=True)
class WorldObject:
    color: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(
    rng: random.Random, num_objects: int | None = None, split: str = "train", twins: bool = False
) -> Scene:
    """A random scene. Objects have distinct colours and cells; the background differs from every object.

    split: "train" never draws a held-out colour+shape pair; "held_out" draws at least one; "any" draws freely.
    twins: the second object takes the first one's shape and size (in scenes of two or more objects), so a caption
    without positions cannot tell them apart; False draws exactly as before (the same scenes from the same seeds).
    """
    n = num_objects or rng.choice((1, 1, 2, 2, 3))
    for _ in range(1000):
        colors = rng.sample(list(COLORS), n)
        objects = tuple(
            WorldObject(c, rng.choice(SHAPES), rng.choice(tuple(SIZES)), p)
            for c, p in zip(colors, rng.sample(POSITIONS, n))
        )
        if twins and n >= 2:
            first = objects[0]
            objects = (first, replace(objects[1], shape=first.shape, size=first.size), *objects[2:])
        held = [(o.color, o.shape) in HELD_OUT_PAIRS for o in objects]
        if (split == "train" and any(held)) or (split == "held_out" and not any(held)):
            continue
        background = rng.choice([b for b in BACKGROUNDS if b not in colors])
        return Scene(background, objects)
    raise RuntimeError("could not sample a scene for this split")
