"""Latent diffusion training (ε-prediction, K3 cosine schedule, CFG dropout to the null embedding).

Trainable: the U-Net, the projection and the null embedding, and optionally the T5 encoder (the released models
keep FLAN-UL2 frozen; the nano family trains its tiny T5 too). The MoVQ is frozen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...checkpoints.io import load_file, load_into, save_safetensors
from ...checkpoints.loading import Components, parse_dtype, save_components
from ...diffusion import NoiseSchedule
from ...models.config import ConfigError
from ...models.seeding import drawing_from
from ...models.text import TextEncoder, build_word_tokenizer, make_projection, new_t5_encoder
from ...models.unet import UNet, UNetConfig
from ...registry import SamplerDefaults, Variant
from ..growth import grow_into
from .base import Recipe, encoded_cache, evaluating, image_grid
from .movq import load_movq_export

SAMPLE_PROMPTS = [
    "a red circle in the top left on a gray background",
    "a large blue square in the center, white background",
    "a small yellow star at the bottom right on a black background",
    "a green triangle on the left and a purple circle on the right, gray background",
]


@dataclass
class TextEncoderParams:
    """``model.text_encoder:`` — a fresh T5 encoder on the shapes world's word vocabulary (``models.text.
    new_t5_encoder``: d_ff defaults to 2·d_model, num_heads to d_model / d_kv), or a pretrained one."""

    pretrained: str | None = None  # a T5 (encoder) folder or hub id, e.g. the FLAN-UL2 encoder
    tokenizer: str = "world"
    d_model: int = 128
    d_ff: int | None = None
    d_kv: int = 32
    num_layers: int = 2
    num_heads: int | None = None
    buckets: int = 16
    max_distance: int = 32


@dataclass
class DiffusionParams:
    """``model:`` of the diffusion recipe."""

    movq: str  # the frozen MoVQ: a movq export or a native model folder (e.g. src/kandinsky3/weights/nano)
    name: str = "custom"
    description: str = "trained with kandinsky3 train"
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderParams = field(default_factory=TextEncoderParams)
    train_text_encoder: bool = True
    min_snr_gamma: float | None = None  # Min-SNR-γ loss weighting
    cfg_dropout: float = 0.1  # fraction of captions replaced by the null context
    init: str | None = None  # a run's model.safetensors or output folder, or an exported model (name or folder)
    grow: bool = False  # with init: the config adds blocks to the init model; they start as identities
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)  # the exported model's sampling defaults
    export_dtype: str | None = None  # e.g. fp16: cast the exported weights

    def validate(self, cfg):
        if not 0 <= self.cfg_dropout <= 1:
            raise ConfigError(f"model.cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.text_encoder.pretrained is None and self.text_encoder.tokenizer != "world":
            raise ConfigError("model.text_encoder.tokenizer must be 'world' (or give model.text_encoder.pretrained)")
        if self.grow and not self.init:
            raise ConfigError("model.grow needs model.init (the smaller model to grow from)")


def new_text_encoder(spec: TextEncoderParams, context_dim: int) -> TextEncoder:
    """A trainable ``TextEncoder``: tokenizer + T5 (fresh, or ``spec.pretrained``) + a fresh projection; no null
    embedding (the trainable keeps it as a parameter and passes it to ``TextEncoder.null_context``)."""
    if spec.pretrained:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer, t5 = AutoTokenizer.from_pretrained(spec.pretrained), T5EncoderModel.from_pretrained(spec.pretrained)
    else:
        from ...world import vocabulary

        tokenizer = build_word_tokenizer(vocabulary())
        t5 = new_t5_encoder(
            len(tokenizer),
            spec.d_model,
            spec.d_ff,
            spec.d_kv,
            spec.num_layers,
            spec.num_heads,
            spec.buckets,
            spec.max_distance,
        )
    return TextEncoder(tokenizer, t5, make_projection(t5.config.d_model, context_dim), None)


class DiffusionTrainable(nn.Module):
    def __init__(self, unet: UNet, text: TextEncoder, train_text_encoder: bool, min_snr_gamma: float | None = None):
        super().__init__()
        self.unet, self.text, self.min_snr_gamma = unet, text, min_snr_gamma
        self.known_region_gamma: float | None = None  # the inpainting recipe's known-region weighting
        self.known_region_drift: float = 0.0  # the inpainting recipe's share of samples with a drifted known region
        self.hole_share: float | None = None  # the inpainting recipe's least share of a sample's loss in the hole
        self.null_embedding = nn.Parameter(torch.randn(text.context_dim) * 0.02)
        self.text.encoder.requires_grad_(train_text_encoder)
        self.schedule = NoiseSchedule.named("cosine")

    def forward(self, batch, generator: torch.Generator):
        """ε-MSE at a uniform timestep; ``generator`` (on the batch's device) draws the timestep and the noise."""
        ids, mask, latents, drop = batch["ids"], batch["mask"], batch["latents"], batch["drop"]
        context, mask = self.text.encode_ids(ids, mask)
        lengths = self.text.prompt_lengths(mask)  # each caption's own crop length, as inference
        # classifier-free guidance dropout → the null context inference uses (always in the graph, so DDP sees
        # the null embedding used on every step)
        null, null_mask = self.text.null_context(context, self.null_embedding)
        context = torch.where(drop[:, None, None], null, context)
        mask = torch.where(drop[:, None], null_mask, mask)
        t = torch.randint(
            0, self.schedule.num_timesteps, (latents.shape[0],), device=latents.device, generator=generator
        )
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        x_t = self.schedule.q_sample(latents, t, noise)
        extra = batch.get("extra_channels")  # the inpainting recipe's [keep-mask, masked-image latent], else None
        # the latent cells the loss treats as known: the U-Net's own keep-mask, or the inpainting recipe's strict one
        keep = batch.get("known_cells", extra[:, :1] if extra is not None else None)
        abar = self.schedule.abar_per_sample(t)
        if self.known_region_drift and extra is not None:
            offset = known_region_drift(latents, keep, abar, self.known_region_drift, generator)
            x_t = x_t + (1 - abar).sqrt().view(-1, 1, 1, 1) * offset
            noise = noise + offset  # the ε that maps the drifted x_t back to the true x0
        eps = self.unet(x_t, t.float(), context, mask, None, lengths, extra_channels=extra)
        error = (eps.float() - noise).square()
        if extra is not None and (self.known_region_gamma or self.hole_share):
            keep = keep.float()
            weight = known_region_weight(keep, abar, self.known_region_gamma or 1.0)
            if self.hole_share:
                weight = hole_share_weight(keep, weight, self.hole_share)
            error = error * weight
        loss = error.mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            loss = loss * min_snr_weight(abar, self.min_snr_gamma)
        return loss.mean()


def min_snr_weight(abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight for ε-prediction, min(SNR, γ) / SNR (Hang et al. 2023): the nearly clean steps,
    whose ε is easy and whose gradients otherwise dominate, count less; convergence is several times faster."""
    snr = abar / (1 - abar)
    return gamma / snr.clamp(min=gamma)  # = 1 where SNR ≤ γ (also at SNR = 0)


def x0_weight(abar: torch.Tensor, cap: float) -> torch.Tensor:
    """min(1/SNR, cap): the ε-MSE weighted this way is the x0-MSE, capped at the pure-noise end. The noisy steps,
    where the sampler lays out what a picture holds, otherwise carry almost none of an ε loss: a conditioning's
    effect on ε there is ~100× smaller than at the nearly clean steps."""
    return ((1 - abar) / abar.clamp(min=1e-8)).clamp(max=cap)


def known_region_weight(keep: torch.Tensor, abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-pixel ε-MSE weight for inpainting (B, 1, h, w): the known region (``keep`` = 1) of a noisy step counts
    min(max(1/SNR, 1), γ) times, the hole once. Where the noise drowns the picture the ε loss hardly depends on the
    model's idea of x0 (an x0 error is scaled by √SNR in ε), yet the sampler reads x0 from those very steps, and
    there the known region has to come from the masked-image channels; this is what they must learn."""
    snr = abar / (1 - abar)
    boost = (1 / snr.clamp(min=1e-8)).clamp(min=1.0, max=gamma)
    return 1 + keep * (boost.view(-1, 1, 1, 1) - 1)


def hole_share_weight(keep: torch.Tensor, weight: torch.Tensor, share: float) -> torch.Tensor:
    """Raise the hole's per-pixel weight (``keep`` = 0) so that the hole carries at least ``share`` of each sample's
    total weight (``weight`` per pixel, (B, 1, h, w)). A small object's box covers 1-4 of nano's 8×8 latent cells,
    so under the known region's boost it had < 1 % of the loss at the noisy steps that decide what the object is; a
    hole that already has its share (large random masks, the whole image) keeps its weights."""
    weight = weight.expand_as(keep)
    hole = 1.0 - keep
    known_total = (weight * keep).sum(dim=(1, 2, 3), keepdim=True)
    hole_cells = hole.sum(dim=(1, 2, 3), keepdim=True)
    wanted = share / (1 - share) * known_total / hole_cells.clamp(min=1)
    return torch.where(hole.bool(), torch.maximum(weight, wanted), weight)


DRIFT_SHRINK = 0.25  # the drifted known region is the true latent scaled by U(1 − this, 1) …
DRIFT_NOISE = 0.08  # … plus white noise of standard deviation U(0, this) (latent units) …
DRIFT_CLIP = 2.0  # … and the drift, in ε units (√SNR × the latent drift), is clipped to ±this


def known_region_drift(
    latents: torch.Tensor, keep: torch.Tensor, abar: torch.Tensor, share: float, generator: torch.Generator
) -> torch.Tensor:
    """ε-space offsets (B, C, h, w) that move x_t's known region off the true latent, for ``share`` of the samples
    (zero elsewhere and in the hole). The sampler's own x0 estimates are never exact: in the known region its
    trajectory drifts from the input (measured on nano: the final latent is the input's ×0.90 plus noise), and a
    model trained only on exact x_t keeps the drift, as x_t looks trustworthy at low noise. With x_t + √(1−ᾱ)·o
    and the target ε + o the model learns to read the known region from the masked-image channels and pull x_t
    back to it — its x0 target stays the true latent. The drift mimics what was measured: a shrink plus noise."""
    b = latents.shape[0]
    u = lambda *shape: torch.rand(shape, device=latents.device, generator=generator)  # noqa: E731
    chosen = (u(b) < share).float().view(b, 1, 1, 1)
    shrink = (DRIFT_SHRINK * u(b)).view(b, 1, 1, 1)
    sigma = (DRIFT_NOISE * u(b)).view(b, 1, 1, 1)
    white = torch.randn(latents.shape, device=latents.device, generator=generator)
    drift = -shrink * latents.float() + sigma * white
    snr = (abar / (1 - abar)).float().view(b, 1, 1, 1)
    return (snr.sqrt() * drift).clamp(-DRIFT_CLIP, DRIFT_CLIP) * chosen * (keep.float() == 1.0)


def initial_weights(init: str) -> dict[str, torch.Tensor]:
    """The trainable's state dict from ``init``: a run's ``model.safetensors``, a run's output folder (its newest
    complete checkpoint), or a whole exported model (a registered name such as ``nano`` or a native folder), so a
    fine-tune can start from the committed weights."""
    if Path(init).is_file():
        return load_file(init)
    if (Path(init) / "checkpoints").is_dir():
        from ..checkpointing import checkpoint_weights

        return load_file(checkpoint_weights(init))
    from ...checkpoints.loading import load_components

    components = load_components(init)
    text = components.text_encoder
    weights = {f"unet.{k}": v for k, v in components.unet.state_dict().items()}
    weights.update({f"text.encoder.{k}": v for k, v in text.encoder.state_dict().items()})
    weights.update({f"text.projection.{k}": v for k, v in text.projection.state_dict().items()})
    weights["null_embedding"] = text.null_embedding
    return weights


class DiffusionRecipe(Recipe):
    Params = DiffusionParams

    def __init__(self, cfg, device, rng):
        super().__init__(cfg, device, rng)
        m = self.params
        self.unet_config = m.unet
        self.movq = load_movq_export(m.movq).to(device)
        with drawing_from(rng.cpu):
            text = new_text_encoder(m.text_encoder, self.unet_config.context_dim)
            self.trainable = DiffusionTrainable(UNet(self.unet_config), text, m.train_text_encoder, m.min_snr_gamma)
        if m.init:  # start from other weights (e.g. to adapt a U-Net to a fine-tuned MoVQ)
            weights, what = initial_weights(m.init), f"diffusion weights in {m.init}"
            if m.grow:  # the config adds attention blocks / T5 layers: they start as identities
                grown = grow_into(self.trainable, weights, what)
                print(f"grown from {m.init}: {len(grown)} new blocks start as identities")
            else:
                load_into(self.trainable, weights, what)
        self.modules = {"model": self.trainable}
        self.variant = Variant(
            m.name,
            m.description,
            self.unet_config,
            self.movq.config,
            m.sampler,
            size=cfg.data.size,
            hub_repo=None,
            movq_file=None,
            text_encoder_dir=None,
        )
        self._cache_latents()

    @torch.no_grad()
    def _cache_latents(self):
        """Encode (and tokenise) an in-memory dataset once; the latents are also kept in ``output_dir`` (keyed by the
        encoder's weights and the images), so a resumed run does not spend minutes re-encoding 100k images on a CPU."""
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is None or "image" not in tensors:
            return
        # a scene's caption is fixed too: tokenised once here, not per batch in the main process (25 ms for a
        # batch of 512, a quarter of the nano U-Net's training step on a GPU)
        tensors["ids"], tensors["mask"] = self.trainable.text.tokenize(self.dataset.captions)
        images = tensors.pop("image")
        cache = encoded_cache(self.cfg.output_dir, "latents", self.movq, images)
        if cache.is_file():
            tensors["latents"] = load_file(cache)["latents"]
            return
        tensors["latents"] = torch.cat(
            [self.movq.encode_untiled(chunk.to(self.device)).cpu() for chunk in images.split(256)]
        )
        if int(os.environ.get("RANK", "0")) == 0:
            save_safetensors({"latents": tensors["latents"]}, cache)

    def prepare(self, batch, ctx):
        text = self.trainable.text
        ids, mask = (batch["ids"], batch["mask"]) if "ids" in batch else text.tokenize(batch["caption"])
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
        else:
            with torch.no_grad():
                latents = self.movq.encode(batch["image"].to(self.device)).float()
        drop = torch.rand(len(batch["caption"]), generator=ctx.generator("cpu")) < self.params.cfg_dropout
        return {
            "ids": ids.to(self.device),
            "mask": mask.to(self.device),
            "latents": latents,
            "drop": drop.to(self.device),
        }

    def step(self, modules, batch, ctx):
        return {"loss": modules["model"](batch, ctx.generator(self.device))}

    def enable_gradient_checkpointing(self):
        self.trainable.unet.gradient_checkpointing = True

    def pipeline(self, module):
        from ...pipeline import Kandinsky3

        text = TextEncoder(
            module.text.tokenizer, module.text.encoder, module.text.projection, module.null_embedding.detach()
        )
        return Kandinsky3(Components(self.variant, module.unet, self.movq, text), device=self.device)

    @torch.no_grad()
    def sample_grid(self, modules):
        with evaluating(modules["model"]) as module:
            pipe = self.pipeline(module)
            rows = [
                pipe.generate(SAMPLE_PROMPTS, seed=0, steps=25, progress=False),
                pipe.generate(SAMPLE_PROMPTS, seed=1, steps=25, progress=False),
            ]
        return image_grid(rows)

    def export(self, modules, path):
        module = modules["model"]
        module.eval()
        pipe = self.pipeline(module)
        dtype = parse_dtype(self.params.export_dtype, None)  # fp16 keeps the committed nano small
        save_components(Components(self.variant, pipe.unet, pipe.movq, pipe.text_encoder), Path(path), "native", dtype)
