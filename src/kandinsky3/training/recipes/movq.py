"""MoVQ autoencoder training: L1 + MSE reconstruction (the shapes world has flat colours and sharp edges; a
perceptual or adversarial term brings little there, so none is used by default).

Two options matter for small objects: ``edge_weight`` up-weights pixels near edges (a plain mean lets a 6-px
star become a blob at almost no cost, since flat backgrounds dominate the pixel count), and
``train_encoder: false`` + ``latent_noise`` fine-tune only the decoder on slightly noisy latents, which keeps
the latent space (so a U-Net trained on it stays valid) while making decoding robust to a denoiser's small
errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...checkpoints.io import save_json, save_safetensors
from ...images import tensor_to_pil
from ...models.movq import MoVQ, MoVQConfig
from ...models.seeding import drawing_from
from .base import Recipe, evaluating, image_grid


@dataclass
class MoVQParams:
    """``model:`` of the movq recipe."""

    movq: MoVQConfig = field(default_factory=MoVQConfig)  # the autoencoder to train from scratch (unless init)
    init: str | None = None  # start from an exported MoVQ (a movq export or a native model folder)
    mse_weight: float = 1.0  # loss = L1 + mse_weight · MSE
    edge_weight: float = 0.0  # per-pixel loss × (1 + edge_weight) within 2 px of a colour change
    latent_noise: float = 0.0  # decode z + s·ε, s ~ U(0, latent_noise) per sample
    train_encoder: bool = True  # false: only the decoder (and post_quant_conv) trains; the latent space stays


def edge_map(x: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(B, 1, H, W) in {0, 1}: pixels within ``radius`` of a colour change in ``x`` (B, 3, H, W)."""
    dy = (x[:, :, 1:] - x[:, :, :-1]).abs().sum(1, keepdim=True)
    dx = (x[..., 1:] - x[..., :-1]).abs().sum(1, keepdim=True)
    change = F.pad(dy, (0, 0, 0, 1)) + F.pad(dx, (0, 1, 0, 0))
    return (F.max_pool2d(change, 2 * radius + 1, stride=1, padding=radius) > 0.1).float()


class MoVQTrainable(torch.nn.Module):
    def __init__(
        self,
        movq: MoVQ,
        mse_weight: float,
        edge_weight: float = 0.0,
        latent_noise: float = 0.0,
        train_encoder: bool = True,
    ):
        super().__init__()
        self.movq, self.mse_weight = movq, mse_weight
        self.edge_weight, self.latent_noise, self.train_encoder = edge_weight, latent_noise, train_encoder
        if not train_encoder:
            movq.encoder.requires_grad_(False)
            movq.quant_conv.requires_grad_(False)

    def forward(self, batch, generator: torch.Generator | None = None):
        """The reconstruction loss; ``generator`` (on the batch's device) draws the latent noise."""
        x = batch["image"]
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            z = self.movq.encode_untiled(x)
        if self.latent_noise and self.training:
            if generator is None:
                raise ValueError("latent_noise needs a generator (the run's random stream)")
            # per-sample noise level in [0, latent_noise]: clean latents stay in the mix
            sigma = torch.rand(z.shape[0], 1, 1, 1, device=z.device, generator=generator) * self.latent_noise
            z = z + sigma * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        recon = self.movq.decode_untiled(z)
        err = (recon - x).abs() + self.mse_weight * (recon - x).square()
        if self.edge_weight:
            err = err * (1.0 + self.edge_weight * edge_map(x))
        return err.mean()


class MoVQRecipe(Recipe):
    Params = MoVQParams

    def __init__(self, cfg, device, rng):
        super().__init__(cfg, device, rng)
        m = self.params
        with drawing_from(rng.cpu):
            if m.init:  # start from an exported MoVQ (e.g. to fine-tune its decoder)
                movq = load_movq_export(m.init).requires_grad_(True).train()
                self.movq_config = movq.config
            else:
                self.movq_config = m.movq
                movq = MoVQ(self.movq_config)
        self.trainable = MoVQTrainable(movq, m.mse_weight, m.edge_weight, m.latent_noise, m.train_encoder)
        self.modules = {"model": self.trainable}
        self.preview = torch.stack([self.dataset[i]["image"] for i in range(min(8, len(self.dataset)))])

    def prepare(self, batch, ctx):
        return {"image": batch["image"].to(self.device)}

    def step(self, modules, batch, ctx):
        return {"loss": modules["model"](batch, ctx.generator(self.device))}

    @torch.no_grad()
    def sample_grid(self, modules):
        with evaluating(modules["model"]) as module:
            x = self.preview.to(next(module.parameters()).device)
            recon = module.movq.decode_untiled(module.movq.encode_untiled(x))
        return image_grid([tensor_to_pil(x), tensor_to_pil(recon)])

    def export(self, modules, path):
        path = Path(path)
        save_safetensors(modules["model"].movq.state_dict(), path / "movq.safetensors")
        save_json({"movq": self.movq_config.to_dict()}, path / "movq.json")


@torch.no_grad()
def rescale_latents(movq: MoVQ, factor: float) -> MoVQ:
    """Make the latent space ``factor``× smaller without changing any reconstruction (an exact reparametrisation):
    the encoder's ``quant_conv`` is divided by ``factor``; everything that reads the latent — ``post_quant_conv``
    and the decoder's spatial-norm 1×1 convs (``conv_y``, ``conv_b``) — multiplies its weights by it.

    Used so the latents suit the official dynamic thresholding, which assumes |x0| mostly ≤ 1.
    """
    movq.quant_conv.weight /= factor
    movq.quant_conv.bias /= factor
    movq.post_quant_conv.weight *= factor
    for name, module in movq.decoder.named_modules():
        if name.endswith(("conv_y", "conv_b")):
            module.weight *= factor
    return movq


def load_movq_export(path) -> MoVQ:
    """A MoVQ written by this recipe's export (or the ``movq.safetensors`` of a native model folder)."""
    from ...checkpoints.io import load_file, load_into, load_json

    path = Path(path)
    meta = load_json(path / "movq.json") if (path / "movq.json").is_file() else load_json(path / "kandinsky3.json")
    movq = MoVQ(MoVQConfig.from_dict(meta["movq"]))
    load_into(movq, load_file(path / "movq.safetensors"), f"MoVQ in {path}")
    return movq.eval().requires_grad_(False)
