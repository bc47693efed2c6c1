"""A two-optimizer toy: a GAN on 2-D points (a ring of Gaussian modes), the worked example of docs/training.md.

It exists to exercise — in seconds, on a CPU — what the diffusion recipes do not: two modules, two optimizers with
their own betas, two named losses stepped in order (the discriminator first, then the generator against the
updated discriminator), and an EMA of the generator only. Tests train it, kill it, resume it and compare weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ...checkpoints.io import save_json, save_safetensors
from ...models.config import ConfigError
from ...models.seeding import drawing_from
from ..protocol import OptimizerSpec
from .base import Recipe


@dataclass
class ToyGANParams:
    """``model:`` of the toy_gan recipe (``data:`` is not used: the points are drawn from ``seed``)."""

    z_dim: int = 4
    hidden: int = 64
    modes: int = 8  # Gaussians evenly spaced on a circle
    radius: float = 2.0
    spread: float = 0.05  # standard deviation of each mode
    num_points: int = 2048  # the training set

    def validate(self, cfg):
        for name in ("z_dim", "hidden", "modes", "num_points"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be ≥ 1, got {getattr(self, name)}")


def ring_points(n: int, modes: int, radius: float, spread: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) points: a uniformly chosen mode on the circle plus N(0, spread²) per coordinate."""
    k = torch.randint(0, modes, (n,), generator=generator)
    angle = 2 * math.pi * k.float() / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + spread * torch.randn(n, 2, generator=generator)


class Points(torch.utils.data.Dataset):
    def __init__(self, points: torch.Tensor):
        self.points = points

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        return {"point": self.points[i]}


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, n_out),
    )


class ToyGANRecipe(Recipe):
    Params = ToyGANParams
    losses: ClassVar[dict[str, str]] = {"discriminator": "discriminator", "generator": "generator"}  # in this order
    ema_modules: ClassVar[tuple[str, ...]] = ("generator",)

    def __init__(self, cfg, device, rng):
        super().__init__(cfg, device, rng)
        p = self.params
        with drawing_from(rng.cpu):
            self.modules = {"generator": mlp(p.z_dim, p.hidden, 2), "discriminator": mlp(2, p.hidden, 1)}

    def make_dataset(self):
        p = self.params
        points = ring_points(p.num_points, p.modes, p.radius, p.spread, torch.Generator().manual_seed(self.cfg.seed))
        return Points(points)

    def parameter_groups(self):
        return {name: list(module.parameters()) for name, module in self.modules.items()}

    def optimizers(self):
        # the usual GAN betas; per-optimizer learning rates come from the YAML's `optimizers:` section
        return {
            name: OptimizerSpec((name,), lr=self.cfg.lr, betas=(0.5, 0.999), weight_decay=self.cfg.weight_decay)
            for name in ("discriminator", "generator")
        }

    def prepare(self, batch, ctx):
        return {"point": batch["point"].to(self.device)}

    def _noise(self, batch, ctx):
        return torch.randn(
            len(batch["point"]), self.params.z_dim, device=self.device, generator=ctx.generator(self.device)
        )

    def step(self, modules, batch, ctx):
        """Non-saturating GAN losses. The generator's loss is computed after the discriminator stepped."""
        g, d = modules["generator"], modules["discriminator"]
        fake = g(self._noise(batch, ctx))
        yield "discriminator", F.softplus(-d(batch["point"])).mean() + F.softplus(d(fake.detach())).mean()
        yield "generator", F.softplus(-d(g(self._noise(batch, ctx)))).mean()

    @torch.no_grad()
    def generate(self, generator_module: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
        z = torch.randn(n, self.params.z_dim, generator=torch.Generator().manual_seed(seed))
        return generator_module(z.to(next(generator_module.parameters()).device)).cpu()

    def sample_grid(self, modules):
        """A scatter plot: the training points in grey, 512 generated ones in red."""
        size, scale = 256, 256 / (2.6 * self.params.radius)
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for points, colour in (
            (self.dataset.points[:512], (170, 170, 170)),
            (self.generate(modules["generator"], 512), (220, 30, 30)),
        ):
            for x, y in points.tolist():
                u, v = size / 2 + x * scale, size / 2 - y * scale
                draw.rectangle((u - 1, v - 1, u + 1, v + 1), fill=colour)
        return image

    def export(self, modules, path):
        path = Path(path)
        save_safetensors(modules["generator"].state_dict(), path / "generator.safetensors")
        save_json(
            {"recipe": "toy_gan", "z_dim": self.params.z_dim, "hidden": self.params.hidden}, path / "generator.json"
        )
