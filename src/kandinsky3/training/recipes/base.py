"""What every recipe shares: the dataset, batching, sample grids."""

from __future__ import annotations

import torch
from PIL import Image

from ..config import TrainConfig
from ..data import make_dataset


def default_collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid


class Recipe:
    extra_sizes: tuple[int, ...] = ()

    def __init__(self, cfg: TrainConfig, device):
        self.cfg, self.device = cfg, device
        self.dataset = make_dataset(cfg.data, self.extra_sizes)
        self.collate = default_collate

    trainable: torch.nn.Module

    def prepare(self, batch: dict) -> dict:
        return batch

    def enable_gradient_checkpointing(self):
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def sample_grid(self, module) -> Image.Image | None:
        return None

    def export(self, module, path):
        raise NotImplementedError
