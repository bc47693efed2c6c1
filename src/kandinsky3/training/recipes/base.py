"""The recipe protocol (docs/training.md, "The training step protocol") and what every recipe shares.

A recipe declares:

- ``Params`` — the dataclass of its ``model:`` section (typed; unknown keys are errors);
- ``modules`` — its trainable modules by name (each prepared by accelerate; the first one's weights are the
  checkpoint's ``model.safetensors``), built in ``__init__`` inside ``drawing_from(rng.cpu)``;
- ``parameter_groups()`` — named lists of trainable parameters;
- ``optimizers()`` — named :class:`OptimizerSpec` s, each over some of those groups;
- ``losses`` — loss name → the optimizer it steps, in the order the loop steps them;
- ``ema_modules`` — which modules keep an exponential moving average (None: all of them);
- ``prepare(batch, ctx)`` and ``step(modules, batch, ctx)`` — ``step`` yields ``(loss name, loss)`` pairs (or
  returns a ``{name: loss}`` dict): the loop back-propagates each loss into its optimizer's parameters, clips,
  steps that optimizer and its schedule, before it asks for the next loss;
- ``sample_grid(modules)`` and ``export(modules, path)`` — on the EMA modules where there are any.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from ...checkpoints.loading import Components, load_components
from ..data import make_dataset
from ..protocol import OptimizerSpec, RandomStreams, StepContext


def default_collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def load_frozen(name_or_path, device) -> Components:
    """A trained model whose U-Net, MoVQ and text encoder a recipe only reads: eval mode, no gradients."""
    components = load_components(name_or_path, device=device)
    for module in (components.unet, components.movq, components.text_encoder):
        module.eval().requires_grad_(False)
    return components


def encoded_cache(output_dir, prefix: str, movq: torch.nn.Module, images: torch.Tensor) -> Path:
    """Where a recipe keeps what it encoded from an in-memory dataset (latents, hints), keyed by the MoVQ encoder's
    weights and the images, so a resumed run reuses it and a changed encoder or dataset never does."""
    key = hashlib.sha256()
    for name, value in movq.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            key.update(name.encode() + value.float().cpu().numpy().tobytes())
    key.update(images.contiguous().numpy())
    return Path(output_dir) / f"{prefix}-{key.hexdigest()[:16]}.safetensors"


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in eval mode for a sample grid or a probe, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid


@dataclass
class NoParams:
    """A recipe without a ``model:`` section."""


class Recipe:
    Params: ClassVar[type] = NoParams
    losses: ClassVar[dict[str, str]] = {"loss": "main"}
    ema_modules: ClassVar[tuple[str, ...] | None] = None
    extra_sizes: tuple[int, ...] = ()

    def __init__(self, cfg, device, rng: RandomStreams):
        """``cfg``: the run's ``TrainConfig`` (``cfg.model`` is an instance of ``Params``)."""
        self.cfg, self.params, self.device = cfg, cfg.model, torch.device(device)
        self.dataset = self.make_dataset()
        self.collate = default_collate
        self.modules: dict[str, torch.nn.Module] = {}

    def make_dataset(self) -> torch.utils.data.Dataset:
        return make_dataset(self.cfg.data, self.extra_sizes)

    @classmethod
    def reads_plain_world_data(cls) -> bool:
        """Whether the recipe's world data honours ``data.object_counts`` and ``data.complete_captions``: true when
        it comes from ``data.make_dataset``; a recipe with its own ``make_dataset`` builds its own samples and
        overrides this only if that dataset reads them too (ip_adapter's ``WorldReferences``)."""
        return cls.make_dataset is Recipe.make_dataset

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Default: one group, every parameter of every module that requires a gradient."""
        return {"trainable": [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """Default: one AdamW, ``main``, over every group, at the config's ``lr`` and ``weight_decay``."""
        return {
            "main": OptimizerSpec(
                tuple(self.parameter_groups()), lr=self.cfg.lr, betas=(0.9, 0.99), weight_decay=self.cfg.weight_decay
            )
        }

    def prepare(self, batch: dict, ctx: StepContext) -> dict:
        return batch

    def step(self, modules: dict[str, torch.nn.Module], batch: dict, ctx: StepContext):
        raise NotImplementedError

    def enable_gradient_checkpointing(self):
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def sample_grid(self, modules: dict[str, torch.nn.Module]) -> Image.Image | None:
        return None

    def probe(self, modules: dict[str, torch.nn.Module]) -> dict[str, float] | None:
        """Quality numbers of the current (EMA) modules, logged with the sample grids (``probe`` lines in
        log.jsonl), e.g. judge-read alignment of a few samples; None: the recipe has none."""
        return None

    def export(self, modules: dict[str, torch.nn.Module], path):
        raise NotImplementedError
