"""Training recipes, registered in ONE place: ``RECIPES`` (name → class). The config (``TrainConfig.recipe``), the
loop and the CLI's ``train RECIPE`` read this table; adding a recipe is one module and one entry here (or, outside
the package, ``RECIPES["mine"] = MyRecipe`` before training). docs/training.md has the protocol and an example."""

from __future__ import annotations

from dataclasses import replace

from .base import Recipe
from .controlnet import ControlNetRecipe
from .clip import ClipRecipe
from .diffusion import DiffusionRecipe
from .flash_add import FlashADDRecipe
from .ip_adapter import IPAdapterRecipe
from .inpainting import InpaintingRecipe
from .movq import MoVQRecipe
from .superres import SuperResRecipe
from .toy_gan import ToyGANRecipe

RECIPES: dict[str, type[Recipe]] = {
    "movq": MoVQRecipe,
    "diffusion": DiffusionRecipe,
    "superres": SuperResRecipe,
    "flash": FlashADDRecipe,
    "controlnet": ControlNetRecipe,
    "inpainting": InpaintingRecipe,
    "toy_gan": ToyGANRecipe,
    "clip": ClipRecipe,
    "ip_adapter": IPAdapterRecipe,
}


def make_recipe(cfg, device, rng=None) -> Recipe:
    """The recipe ``cfg.recipe`` from the table; ``rng`` is the run's random stream (a fresh one seeded with
    ``cfg.seed`` when not given)."""
    from ..protocol import RandomStreams

    from ...models.config import build_dataclass, unknown_key

    if cfg.recipe not in RECIPES:
        raise unknown_key(cfg.recipe, RECIPES, what="recipe")
    cls = RECIPES[cfg.recipe]
    if not isinstance(cfg.model, cls.Params):  # a TrainConfig built by hand: `model` as a dict, or left out
        cfg = replace(cfg, model=build_dataclass(cls.Params, cfg.model or {}, "model"))
    return cls(cfg, device, rng if rng is not None else RandomStreams(cfg.seed, device))


__all__ = ["RECIPES", "Recipe", "make_recipe"]
