"""The procedural shapes world: scenes, anti-aliased renders, captions, annotations and a judge."""

from .captions import caption_scene, parse_caption, vocabulary
from .dataset import ShapesDataset, world_sample
from .judge import judge
from .render import render
from .scene import BACKGROUNDS, COLORS, HELD_OUT_PAIRS, POSITIONS, SHAPES, SIZES, Scene, WorldObject, sample_scene

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "HELD_OUT_PAIRS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "ShapesDataset",
    "WorldObject",
    "caption_scene",
    "judge",
    "parse_caption",
    "render",
    "sample_scene",
    "vocabulary",
    "world_sample",
]
