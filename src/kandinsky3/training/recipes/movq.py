"""MoVQ autoencoder training: L1 + MSE reconstruction (the shapes world has flat colours and sharp edges; a
perceptual or adversarial term brings little there, so none is used by default)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...checkpoints.io import save_json, save_safetensors
from ...images import tensor_to_pil
from ...models.movq import MoVQ, MoVQConfig
from .base import Recipe, image_grid


class MoVQTrainable(torch.nn.Module):
    def __init__(self, movq: MoVQ, mse_weight: float):
        super().__init__()
        self.movq, self.mse_weight = movq, mse_weight

    def forward(self, batch):
        x = batch["image"]
        recon = self.movq.decode_untiled(self.movq.encode_untiled(x))
        return F.l1_loss(recon, x) + self.mse_weight * F.mse_loss(recon, x)


class MoVQRecipe(Recipe):
    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        model_cfg = dict(cfg.model.get("movq", {}))
        self.movq_config = MoVQConfig.from_dict(model_cfg)
        torch.manual_seed(cfg.seed)
        self.trainable = MoVQTrainable(MoVQ(self.movq_config), cfg.model.get("mse_weight", 1.0))
        self.preview = torch.stack([self.dataset[i]["image"] for i in range(8)])

    def prepare(self, batch):
        return {"image": batch["image"].to(self.device)}

    @torch.no_grad()
    def sample_grid(self, module):
        module.eval()
        x = self.preview.to(next(module.parameters()).device)
        recon = module.movq.decode_untiled(module.movq.encode_untiled(x))
        module.train()
        return image_grid([tensor_to_pil(x), tensor_to_pil(recon)])

    def export(self, module, path):
        path = Path(path)
        save_safetensors(module.movq.state_dict(), path / "movq.safetensors")
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
