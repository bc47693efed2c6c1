"""Training recipes: each a short loss + what is trainable + how to export it."""

from __future__ import annotations


def make_recipe(cfg, device):
    if cfg.recipe == "movq":
        from .movq import MoVQRecipe

        return MoVQRecipe(cfg, device)
    if cfg.recipe == "diffusion":
        from .diffusion import DiffusionRecipe

        return DiffusionRecipe(cfg, device)
    if cfg.recipe == "superres":
        from .superres import SuperResRecipe

        return SuperResRecipe(cfg, device)
    raise ValueError(f"unknown recipe {cfg.recipe!r}")
