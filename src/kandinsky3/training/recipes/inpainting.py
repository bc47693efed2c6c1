"""Inpainting fine-tuning, the Kandinsky 3.1 way: object boxes as masks, prompted with the box's own caption.

The diffusion recipe with three differences:

- the U-Net takes 9 input channels ``[x_t, keep-mask, masked-image latent]``, built per batch by
  :func:`~kandinsky3.diffusion.inpainting.inpainting_channels` — the function inference uses;
- each sample gets a mask from :class:`~kandinsky3.training.masks.MaskSampler` (by default 50 % box-based, 45 %
  random strokes/boxes, 5 % whole image); a box-based mask is prompted with that object's region caption, the
  others with the whole-image caption (``masks: {box: 0, shape: 0}`` is the Kandinsky 3.0 random-mask regime);
- ``init:`` may be a text→image model: its U-Net's ``in_layer`` gets the 5 extra input channels zero-initialised,
  so the model starts as exactly the base model (which ignores the mask) and learns to use them. ``shares:``
  freezes the text encoder and projection of that model and exports only the U-Net (+ null embedding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...checkpoints.io import load_into
from ...diffusion.inpainting import inpainting_channels
from ...models.config import ConfigError
from ...registry import INPAINTING_THRESHOLD_PERCENTILE
from ...world.dataset import float_pixels
from ..masks import MaskMixture, MaskSampler, as_numpy_generator
from ..region_data import REGION_PROMPTS, CocoRegions, WorldRegions
from .base import evaluating, image_grid
from .diffusion import DiffusionParams, DiffusionRecipe, initial_weights

IN_LAYER = "unet.in_layer.weight"
GRID_SCENES = 4


@dataclass
class InpaintingParams(DiffusionParams):
    """``model:`` of the inpainting recipe: the diffusion recipe's, plus the masks and the region prompts."""

    masks: MaskMixture = field(default_factory=MaskMixture)
    region_prompts: str = "caption"  # caption (region captions) | class (class names: the ablation)
    annotations: str | None = None  # folder data: COCO-style boxes (default DATA_PATH/annotations.json)
    region_manifest: str | None = None  # folder data: caption-regions JSONL (default DATA_PATH/regions.jsonl)
    shares: str | None = None  # freeze and reuse this model's T5, projection and MoVQ; export the U-Net only
    new_input_lr_scale: float = 1.0  # the in_layer's mask / masked-latent weights learn this many times faster
    known_region_gamma: float | None = None  # weight the known region's ε-MSE by min(max(1/SNR, 1), γ)
    known_region_drift: float = 0.0  # share of samples whose x_t known region drifts off (diffusion.known_region_drift)
    hole_share: float | None = None  # the hole carries at least this share of each sample's loss (hole_share_weight)
    strict_known: bool = False  # the loss's known region (boost, drift): only latent cells with no repainted pixel

    def validate(self, cfg):
        super().validate(cfg)
        self.masks.validate()
        if self.region_prompts not in REGION_PROMPTS:
            raise ConfigError(f"model.region_prompts must be one of {', '.join(REGION_PROMPTS)}")
        if self.grow:
            raise ConfigError("model.grow is not supported by the inpainting recipe (grow the base model first)")
        if not self.new_input_lr_scale > 0:
            raise ConfigError(f"model.new_input_lr_scale must be > 0, got {self.new_input_lr_scale}")
        if self.known_region_gamma is not None and not self.known_region_gamma >= 1:
            raise ConfigError(f"model.known_region_gamma must be ≥ 1 (or unset), got {self.known_region_gamma}")
        if not 0.0 <= self.known_region_drift <= 1.0:
            raise ConfigError(f"model.known_region_drift is a share in [0, 1], got {self.known_region_drift}")
        if self.hole_share is not None and not 0.0 < self.hole_share < 1.0:
            raise ConfigError(f"model.hole_share is a share in (0, 1) (or unset), got {self.hole_share}")
        if self.shares and self.train_text_encoder:
            raise ConfigError("model.shares reuses a frozen text encoder: set model.train_text_encoder: false")


def widen_in_layer(weights: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """A base U-Net's ``in_layer`` (out, 4, k, k) → (out, ``channels``, k, k), the new inputs zero: the widened
    model computes exactly what the base did, whatever the mask and masked latent."""
    w = weights.get(IN_LAYER)
    if w is None or w.shape[1] == channels:
        return weights
    if w.shape[1] > channels:
        raise ConfigError(f"the init U-Net takes {w.shape[1]} input channels, more than the config's {channels}")
    pad = torch.zeros(w.shape[0], channels - w.shape[1], *w.shape[2:], dtype=w.dtype)
    return {**weights, IN_LAYER: torch.cat([w, pad], dim=1)}


class ScaledInputConv(nn.Conv2d):
    """The U-Net's ``in_layer`` with its input channels from ``first`` on stored divided by ``scale``: AdamW moves
    each parameter by about the learning rate per step whatever its gradient's size, so those weights (zero at the
    start: the mask and the masked latent) learn ``scale`` × faster than the rest. ``state_dict`` and
    ``load_state_dict`` hold the true weights, so checkpoints, EMA exports and the exported U-Net are ordinary."""

    def __init__(self, conv: nn.Conv2d, first: int, scale: float):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        self.first, self.scale = first, scale
        self.register_state_dict_post_hook(ScaledInputConv._true_weights)
        self.register_load_state_dict_pre_hook(ScaledInputConv._stored_weights)
        self.load_state_dict(conv.state_dict())

    def _factor(self, like: torch.Tensor) -> torch.Tensor:
        f = torch.ones(1, like.shape[1], 1, 1, dtype=like.dtype, device=like.device)
        f[:, self.first :] = self.scale
        return f

    def forward(self, x):
        return self._conv_forward(x, self.weight * self._factor(self.weight), self.bias)

    @staticmethod
    def _true_weights(module, state_dict, prefix, local_metadata):
        w = state_dict[prefix + "weight"]
        state_dict[prefix + "weight"] = w * module._factor(w)

    @staticmethod
    def _stored_weights(module, state_dict, prefix, *args):
        if prefix + "weight" in state_dict:
            w = state_dict[prefix + "weight"]
            state_dict[prefix + "weight"] = w / module._factor(w)


def strictly_known_cells(repaint: torch.Tensor, latent_size) -> torch.Tensor:
    """1 for the latent cells none of whose pixels is repainted (B, 1, h, w). The U-Net's keep-mask samples one pixel
    per cell (``latent_keep_mask``, the released rule), so a cell a hole only partly covers counts as known: on nano
    a small object's box + rim has ≈ 40 % of its pixels in such cells. Their true latent holds part of the object,
    which the masked image has erased, so boosting and drifting them as known asks for an object edge at up to γ×
    weight from a cell the model is told to copy; with this rule they are trained as the hole is."""
    return (F.adaptive_max_pool2d((repaint > 0).float(), latent_size) == 0).float()


class InpaintingRecipe(DiffusionRecipe):
    Params = InpaintingParams

    def __init__(self, cfg, device, rng):
        m = cfg.model
        if m.unet.num_channels != 9:
            raise ConfigError(
                f"model.unet.num_channels must be 9 for inpainting (latent 4 + mask 1 + masked latent 4), "
                f"got {m.unet.num_channels}"
            )
        # the base recipe builds the modules without `init` (its weights have 4 input channels); loaded below
        super().__init__(replace(cfg, model=replace(m, init=None)), device, rng)
        self.cfg, self.params = cfg, m
        if m.init:
            weights = widen_in_layer(initial_weights(m.init), m.unet.num_channels)
            load_into(self.trainable, weights, f"weights in {m.init}")
        if m.shares:
            self.trainable.text.requires_grad_(False)
        if m.new_input_lr_scale != 1.0:
            unet = self.trainable.unet
            unet.in_layer = ScaledInputConv(unet.in_layer, self.movq.config.embed_dim, m.new_input_lr_scale)
        self.trainable.known_region_gamma = m.known_region_gamma
        self.trainable.known_region_drift = m.known_region_drift
        self.trainable.hole_share = m.hole_share
        # an inpainting model samples as the official inpainting pipeline does (spec §4.2), whatever its init's defaults
        sampler = replace(self.variant.sampler, threshold_percentile=INPAINTING_THRESHOLD_PERCENTILE)
        self.variant = replace(self.variant, inpainting=True, sampler=sampler)
        self.mask_sampler = MaskSampler(m.masks)

    def make_dataset(self):
        d, m = self.cfg.data, self.cfg.model
        if d.source == "world":
            return WorldRegions(d.length, d.split, d.size, m.region_prompts)
        if d.source == "folder":
            return CocoRegions(d.path, d.size, m.annotations, m.region_prompts, m.region_manifest)
        raise ConfigError(f"the inpainting recipe reads data.source world or folder (with boxes), not {d.source}")

    @torch.no_grad()
    def _cache_latents(self):
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is None or "image" not in tensors:
            return
        pixels = tensors["image"]  # uint8: the masked images are made from these at every step
        tensors["image"] = float_pixels(pixels)
        super()._cache_latents()
        tensors["pixels"] = pixels

    def sample_masks(self, batch, generator) -> tuple[torch.Tensor, list[str], list[str]]:
        """A mask per sample (B, 1, H, W), its prompt (the region caption for box-based masks) and its kind."""
        rng = as_numpy_generator(generator)
        pixels = batch["pixels"] if "pixels" in batch else batch["image"]
        h, w = pixels.shape[-2:]
        masks, prompts, kinds = [], [], []
        for i in range(pixels.shape[0]):
            boxes = [b for b in batch["boxes"][i].tolist() if b[0] >= 0]
            sampled = self.mask_sampler.sample(w, h, boxes, rng)
            masks.append(sampled.mask)
            kinds.append(sampled.kind)
            index = sampled.object_index
            prompts.append(batch["caption"][i] if index is None else batch["regions"][i][index])
        return torch.from_numpy(np.stack(masks))[:, None], prompts, kinds

    def prepare(self, batch, ctx):
        gen = ctx.generator("cpu")
        repaint, prompts, _ = self.sample_masks(batch, gen)
        pixels = float_pixels(batch["pixels"] if "pixels" in batch else batch["image"]).to(self.device)
        with torch.no_grad():
            extra = inpainting_channels(self.movq.encode, pixels, repaint.to(self.device))
            latents = batch["latents"].to(self.device) if "latents" in batch else self.movq.encode(pixels).float()
        ids, mask = self.trainable.text.tokenize(prompts)
        drop = torch.rand(len(prompts), generator=gen) < self.params.cfg_dropout
        known = {}
        if self.params.strict_known:  # only then: the default path does no per-step pooling
            known["known_cells"] = strictly_known_cells(repaint, extra.shape[-2:]).to(self.device)
        return {
            **known,
            "ids": ids.to(self.device),
            "mask": mask.to(self.device),
            "latents": latents,
            "drop": drop.to(self.device),
            "extra_channels": extra,
        }

    @torch.no_grad()
    def sample_grid(self, modules):
        """Rows per held-out test scene: input, mask (the object's box), output with its caption, output with
        another colour."""
        from ...world.dataset import world_sample
        from ...world.render import render

        from PIL import Image

        rows = []
        with evaluating(modules["model"]) as module:
            pipe = self.pipeline(module)
            for i in range(GRID_SCENES):
                s = world_sample(i, "test", self.cfg.data.size)
                obj = s.scene.objects[0]
                x0, y0, x1, y1 = render(s.scene, self.cfg.data.size).boxes[0]
                mask = np.zeros((self.cfg.data.size,) * 2, np.float32)
                mask[y0:y1, x0:x1] = 1
                other = "blue" if obj.color != "blue" else "red"
                outs = pipe.inpaint(
                    s.image, mask, [f"a {obj.color} {obj.shape}", f"a {other} star"], seed=0, steps=15, progress=False
                )
                rows.append([s.image, Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB"), *outs])
        return image_grid(rows)

    def export(self, modules, path):
        super().export(modules, path)
        if self.params.shares:
            prune_to_unet(Path(path), self.params.shares)


def prune_to_unet(folder: Path, shares: str):
    """Keep only the U-Net (+ null embedding) of an exported native folder; the rest comes from ``shares``."""
    import shutil

    for name in ("projection.safetensors", "movq.safetensors"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "text_encoder", ignore_errors=True)
    meta_path = folder / "kandinsky3.json"
    meta = json.loads(meta_path.read_text())
    meta["shares"] = shares
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


__all__ = ["InpaintingParams", "InpaintingRecipe", "prune_to_unet", "widen_in_layer"]
