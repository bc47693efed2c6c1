"""Deterministic captioned samples of the shapes world, as a map-style torch dataset."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..images import pil_to_tensor

from .captions import caption_scene
from .render import render
from .scene import Scene, sample_scene

SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "held_out": 2_000_003, "test": 3_000_017}
TWINS_SEED = 4_000_037  # which scenes of a ShapesDataset are made twins (its own stream: the scenes' draws stay)


@dataclass
class Sample:
    scene: Scene
    caption: str
    image: Image.Image


def world_sample(
    index: int,
    split: str = "train",
    size: int = 64,
    num_objects: int | None = None,
    complete_caption: bool = False,
    twins: bool = False,
) -> Sample:
    """Sample ``index`` of a split: the same scene, caption and pixels on every machine (``twins``: see
    :func:`sample_scene`)."""
    rng = random.Random(SPLIT_SEEDS[split] + index * 7919)
    pairs = "held_out" if split == "held_out" else ("train" if split == "train" else "any")
    scene = sample_scene(rng, num_objects, split=pairs, twins=twins)
    caption = caption_scene(scene, rng, complete=complete_caption)
    return Sample(scene, caption, render(scene, size).image)


def makes_twins(index: int, share: float) -> bool:
    """Whether scene ``index`` of a dataset with ``twins_share`` = ``share`` is drawn with twins (its own stream)."""
    return share > 0 and random.Random(TWINS_SEED + index).random() < share


class ShapesDataset(torch.utils.data.Dataset):
    """(image in [-1, 1] (3, S, S), caption) pairs; ``extra_sizes`` also returns the same scene at other sizes.

    ``object_counts``: scene ``i`` has ``object_counts[i % len(object_counts)]`` objects (None: the world's own
    draw, 1, 1, 2, 2 or 3); ``complete_captions``: every caption states every attribute (the eval captions' form)
    instead of the varied, partial ones; ``twins_share``: the share of scenes (of two or more objects) whose first two
    objects have one shape and size — twins, which a caption without positions cannot tell apart (the world's own
    draw makes them in ≈ 16 % of such scenes; docs/controlnet.md)."""

    def __init__(
        self,
        length: int,
        split: str = "train",
        size: int = 64,
        extra_sizes: tuple[int, ...] = (),
        object_counts: tuple[int, ...] | None = None,
        complete_captions: bool = False,
        twins_share: float = 0.0,
    ):
        if object_counts is not None and not (len(object_counts) and all(n >= 1 for n in object_counts)):
            raise ValueError(f"object_counts must be a non-empty list of counts ≥ 1 (or None), got {object_counts}")
        if not 0.0 <= twins_share <= 1.0:
            raise ValueError(f"twins_share must be a share from 0 to 1, got {twins_share}")
        self.twins_share = twins_share
        self.length, self.split, self.size, self.extra_sizes = length, split, size, extra_sizes
        self.object_counts = tuple(object_counts) if object_counts is not None else None
        self.complete_captions = complete_captions

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        counts = self.object_counts
        count = counts[index % len(counts)] if counts else None
        twins = makes_twins(index, self.twins_share)
        s = world_sample(index, self.split, self.size, count, self.complete_captions, twins)
        item = {"image": to_tensor(s.image), "caption": s.caption}
        for extra in self.extra_sizes:
            item[f"image_{extra}"] = to_tensor(render(s.scene, extra).image)
        return item


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    return pil_to_tensor(image)[0]


def pil_to_bytes(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8: a render's own pixels, a quarter of ``to_tensor``'s memory."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Stored pixels (…, 3, H, W) → float32 in [-1, 1]: uint8 ones bit for bit as ``to_tensor`` reads the same
    render (on the CPU; a CUDA division by a scalar may round 1 ulp apart), float ones as they are."""
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels.float()
