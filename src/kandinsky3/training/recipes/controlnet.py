"""ControlNet training (the released HED recipe, spec §8.4): a ControlNet beside a frozen base model.

The ControlNet starts as a copy of the base U-Net's encoder (time embedding, pooling, input layer, every down level
but the last) with its zero layers zero, so step 0 is exactly the base model; only the ControlNet trains (AdamW,
released lr 1e-5), on the base's own ε-prediction loss with the residuals added to the skips. Half the captions
(``empty_prompt``) are replaced by the unconditional context the sampler's guidance branch uses (nano: its null
embedding), so the ControlNet learns to carry the layout alone. ``drop_positions`` rewrites a share of the rest
without their position words, so the layout has to come from the hint.

Hints are the **soft edges** (:func:`kandinsky3.edges.soft_edges`) of each training image, 8-bit rounded, three
equal channels — the same extractor and rounding that ``control()`` applies to a user's picture, so training and
inference see the same kind of map. With an in-memory dataset (the shapes world) latents and hints are computed
once at the start and kept (with the run, keyed by the images); otherwise per batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...checkpoints.controlnet import save_controlnet
from ...checkpoints.io import load_file, load_into, save_safetensors
from ...checkpoints.loading import Components, parse_dtype
from ...diffusion import NoiseSchedule
from ...edges import soft_edges
from ...models.config import ConfigError
from ...models.controlnet import ControlNet
from ...models.seeding import drawing_from
from ..object_weighting import batch_pixel_weight, check_object_weight, object_coverage, weighted_square_error
from .base import Recipe, encoded_cache, evaluating, image_grid, load_frozen
from .diffusion import x0_weight


@dataclass
class ControlNetParams:
    """``model:`` of the controlnet recipe."""

    base: str = "nano"  # the frozen base model: a registered name or a model folder
    name: str = "custom-controlnet"
    description: str = "trained with kandinsky3 train controlnet"
    hint_channels: int = 3
    empty_prompt: float = 0.5  # share of captions replaced by the unconditional context (released: 50 %)
    drop_positions: float = 0.5  # share of the other captions with their position phrases removed
    init: str | None = None  # continue from a run's model.safetensors, a run folder or a ControlNet folder
    timestep_range: tuple[int, int] = (0, 1000)  # t ~ U[lo, hi); the layout is decided at the noisy end
    zero_hint_out: bool = True  # released: the hint encoder's last conv starts at zero too (False: PyTorch's init)
    x0_weight_cap: float | None = None  # weight the ε-MSE by min(1/SNR, cap) (= x0-MSE, capped): the noisy end
    object_weight: float = 1.0  # latent pixels covered by objects count this many times a background one
    export_dtype: str | None = None  # e.g. fp16

    def validate(self, cfg):
        for name in ("empty_prompt", "drop_positions"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"model.{name} must be in [0, 1], got {value}")
        check_object_weight(self.object_weight)
        lo, hi = self.timestep_range
        if not 0 <= lo < hi <= 1000:
            raise ConfigError(f"model.timestep_range must satisfy 0 ≤ lo < hi ≤ 1000, got {self.timestep_range}")


def hints_from_images(images: torch.Tensor) -> torch.Tensor:
    """Training hints from images in [-1, 1] (B, 3, H, W): soft edges of the [0, 1] pixels, rounded to 8 bits
    as :func:`~kandinsky3.edges.extract_edges` rounds them, (B, 1, H, W) uint8 (expanded to 3 channels later)."""
    edges = soft_edges(((images.float() + 1) / 2).clamp(0, 1))
    return (edges * 255).round().to(torch.uint8)


def position_stripper(positions: dict[str, tuple[str, ...]]):
    """A function removing every position phrase of a vocabulary (``{position: phrases}``) from a caption."""
    phrases = sorted({p for ps in positions.values() for p in ps}, key=len, reverse=True)
    pattern = re.compile(r"\s+(?:" + "|".join(re.escape(p) for p in phrases) + r")(?=\s|,|$)")

    def strip(caption: str) -> str:
        return re.sub(r"\s+", " ", pattern.sub("", caption)).strip()

    return strip


def strip_positions(caption: str) -> str:
    """The caption without its position phrases ("a red circle in the top left" → "a red circle")."""
    from ...world.captions import POSITION_PHRASES

    return position_stripper(POSITION_PHRASES)(caption)


class ControlNetRecipe(Recipe):
    Params = ControlNetParams

    def __init__(self, cfg, device, rng):
        super().__init__(cfg, device, rng)
        p = self.params
        base = load_frozen(p.base, device)
        self.base_variant, self.unet, self.movq, self.text = base.variant, base.unet, base.movq, base.text_encoder
        self.schedule = NoiseSchedule.named("cosine")
        with drawing_from(rng.cpu):
            net = ControlNet.from_unet(self.unet, p.hint_channels)
            if not p.zero_hint_out:  # the residual convs stay zero: still exactly the base model at step 0
                net.input_hint_block.out.reset_parameters()
        if p.init:
            load_into(net, _initial_weights(p.init), f"ControlNet weights in {p.init}")
        self.modules = {"controlnet": net.train().requires_grad_(True)}
        from ...world.captions import POSITION_PHRASES

        self._strip = position_stripper(POSITION_PHRASES)
        self._cache()

    @torch.no_grad()
    def _cache(self):
        """Latents and hints of an in-memory dataset, computed once (and kept in ``output_dir``, keyed by the
        MoVQ encoder and the images, so a resumed run does not recompute them)."""
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is None or "image" not in tensors:
            return
        images = tensors.pop("image")
        if self.params.object_weight != 1:  # cheap (no encoder): recomputed rather than cached
            tensors["objects"] = object_coverage(images, self.base_variant.movq.downsample_factor)
        cache = encoded_cache(self.cfg.output_dir, "controlnet-cache", self.movq, images)
        if cache.is_file():
            tensors.update(load_file(cache))
            return
        from tqdm.auto import tqdm

        latents, hints = [], []
        for chunk in tqdm(images.split(256), desc="latents + hints", leave=False):
            latents.append(self.movq.encode_untiled(chunk.to(self.device)).float().cpu())
            hints.append(hints_from_images(chunk))
        tensors["latents"], tensors["hint"] = torch.cat(latents), torch.cat(hints)
        save_safetensors({"latents": tensors["latents"], "hint": tensors["hint"]}, cache)

    def prepare(self, batch, ctx):
        p, g = self.params, ctx.generator("cpu")
        captions = list(batch["caption"])
        n = len(captions)
        empty = torch.rand(n, generator=g) < p.empty_prompt
        strip = torch.rand(n, generator=g) < p.drop_positions
        captions = [self._strip(c) if s else c for c, s in zip(captions, strip.tolist())]
        with torch.no_grad():
            if "latents" in batch:
                latents, hints = batch["latents"].to(self.device), batch["hint"]
            else:
                latents = self.movq.encode(batch["image"].to(self.device)).float()
                hints = hints_from_images(batch["image"])
            ids, mask = self.text.tokenize(captions)
            context, mask = self.text.encode_ids(ids.to(self.device), mask.to(self.device))
            lengths = self.text.prompt_lengths(mask)
            null, null_mask = self.text.unconditional(context)
            drop = empty.to(self.device)
            context = torch.where(drop[:, None, None], null.to(context.dtype), context)
            mask = torch.where(drop[:, None], null_mask.to(mask.device, mask.dtype), mask)
        hint = (hints.float() / 255).expand(-1, p.hint_channels, -1, -1).to(self.device)
        out = {"latents": latents, "hint": hint, "context": context.float(), "mask": mask, "lengths": lengths}
        if p.object_weight != 1:
            factor = self.base_variant.movq.downsample_factor
            out["pixel_weight"] = batch_pixel_weight(batch, factor, p.object_weight, self.device)
        return out

    def step(self, modules, batch, ctx):
        g = ctx.generator(self.device)
        x0 = batch["latents"]
        b = x0.shape[0]
        lo, hi = self.params.timestep_range
        t = torch.randint(lo, hi, (b,), device=x0.device, generator=g)
        noise = torch.randn(x0.shape, device=x0.device, generator=g)
        x_t = self.schedule.q_sample(x0, t, noise)
        text = dict(context=batch["context"], context_mask=batch["mask"], context_lengths=batch["lengths"])
        residuals = modules["controlnet"](x_t, t.float(), batch["hint"], **text)
        eps = self.unet(x_t, t.float(), control_residuals=residuals, **text)
        loss = weighted_square_error(eps, noise, batch).mean(dim=(1, 2, 3))
        cap = self.params.x0_weight_cap
        if cap:  # x0-space error ∝ ε error / SNR: the steps that decide the layout count most
            loss = loss * x0_weight(self.schedule.abar_per_sample(t), cap)
        return {"loss": loss.mean()}

    def pipeline(self, net):
        from ...pipeline import Kandinsky3

        pipe = Kandinsky3(Components(self.base_variant, self.unet, self.movq, self.text), device=self.device)
        pipe.controlnet = net
        return pipe

    @torch.no_grad()
    def sample_grid(self, modules):
        """Rows: held-out hints, then the ControlNet's pictures from their captions without positions (one batch)."""
        from ...edges import edges_to_image
        from ...world import world_sample

        samples = [world_sample(i, "val", self.cfg.data.size, complete_caption=True) for i in range(4)]
        hints = [edges_to_image(hints_from_images(_pixels(s.image)).float() / 255) for s in samples]
        captions = [self._strip(s.caption) for s in samples]
        with evaluating(modules["controlnet"]) as net:
            pipe = self.pipeline(net)
            images = pipe.control(hints, captions, hint_is_edges=True, seed=[0, 1, 2, 3], steps=20, progress=False)
        return image_grid([hints, images])

    def export(self, modules, path):
        net = modules["controlnet"].eval()
        save_controlnet(
            net,
            Path(path),
            self.params.name,
            parse_dtype(self.params.export_dtype, None),
            description=self.params.description,
            base=self.params.base if not Path(self.params.base).exists() else Path(self.params.base).name,
            hint_method="soft",  # kandinsky3.edges.soft_edges, 8-bit, three equal channels, [0, 1]
        )


def _pixels(image) -> torch.Tensor:
    from ...images import pil_to_tensor

    return pil_to_tensor(image)


def _initial_weights(init: str) -> dict[str, torch.Tensor]:
    path = Path(init)
    if path.is_file():
        return load_file(path)
    if (path / "checkpoints").is_dir():
        from ..checkpointing import checkpoint_weights

        return load_file(checkpoint_weights(path))
    from ...checkpoints.controlnet import read_controlnet

    _, sd, _ = read_controlnet(path)
    return {k: v.float() for k, v in sd.items()}


__all__ = [
    "ControlNetParams",
    "ControlNetRecipe",
    "hints_from_images",
    "position_stripper",
    "strip_positions",
]
