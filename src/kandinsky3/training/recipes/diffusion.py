"""Latent diffusion training (ε-prediction, K3 cosine schedule, CFG dropout to the null embedding).

Trainable: the U-Net, the projection and the null embedding, and optionally the T5 encoder (the released models
keep FLAN-UL2 frozen; the nano family trains its tiny T5 too). The MoVQ is frozen.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ...checkpoints.io import load_file, load_into, save_safetensors
from ...checkpoints.loading import Components, parse_dtype, save_components
from ...diffusion import NoiseSchedule
from ...models.text import TextEncoder, build_word_tokenizer, make_projection
from ...models.unet import UNet, UNetConfig
from ...registry import SamplerDefaults, Variant
from ..growth import grow_into
from .base import Recipe, image_grid
from .movq import load_movq_export

SAMPLE_PROMPTS = [
    "a red circle in the top left on a gray background",
    "a large blue square in the center, white background",
    "a small yellow star at the bottom right on a black background",
    "a green triangle on the left and a purple circle on the right, gray background",
]


def build_text_encoder(spec: dict, context_dim: int) -> tuple[object, nn.Module]:
    """Tokenizer + T5 encoder from a recipe's ``text_encoder`` section (a fresh tiny T5, or a pretrained path)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    if spec.get("pretrained"):
        return AutoTokenizer.from_pretrained(spec["pretrained"]), T5EncoderModel.from_pretrained(spec["pretrained"])
    if spec.get("tokenizer", "world") != "world":
        raise ValueError("text_encoder.tokenizer must be 'world' (or give text_encoder.pretrained)")
    from ...world import vocabulary

    tokenizer = build_word_tokenizer(vocabulary())
    d_model = spec.get("d_model", 128)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=spec.get("d_ff", 2 * d_model),
                      d_kv=spec.get("d_kv", 32), num_layers=spec.get("num_layers", 2),
                      num_heads=spec.get("num_heads", d_model // spec.get("d_kv", 32)),
                      feed_forward_proj="gated-silu", relative_attention_num_buckets=spec.get("buckets", 16),
                      relative_attention_max_distance=spec.get("max_distance", 32), dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    return tokenizer, T5EncoderModel(config)


class DiffusionTrainable(nn.Module):
    def __init__(self, unet: UNet, text: TextEncoder, train_text_encoder: bool, min_snr_gamma: float | None = None):
        super().__init__()
        self.unet, self.text, self.min_snr_gamma = unet, text, min_snr_gamma
        self.null_embedding = nn.Parameter(torch.randn(text.context_dim) * 0.02)
        self.text.encoder.requires_grad_(train_text_encoder)
        self.schedule = NoiseSchedule.named("cosine")

    def forward(self, batch):
        ids, mask, latents, drop = batch["ids"], batch["mask"], batch["latents"], batch["drop"]
        length = int(mask.sum(1).max()) + 1
        context = self.text._encode_ids(ids, mask, min(length, ids.shape[1]))
        mask = mask[:, : context.shape[1]]
        lengths = (mask.sum(1) + 1).clamp(max=ids.shape[1])
        # classifier-free guidance dropout → the official null context (always in the graph, so DDP sees the
        # null embedding used on every step)
        null = torch.zeros_like(context)
        null[:, 0] = self.null_embedding.to(context.dtype)
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = 1
        context = torch.where(drop[:, None, None], null, context)
        mask = torch.where(drop[:, None], null_mask, mask)
        t = torch.randint(0, self.schedule.num_timesteps, (latents.shape[0],), device=latents.device)
        noise = torch.randn_like(latents)
        x_t = self.schedule.q_sample(latents, t, noise)
        eps = self.unet(x_t, t.float(), context, mask, None, lengths)
        loss = (eps.float() - noise).square().mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            loss = loss * min_snr_weight(self.schedule.alphas_cumprod.to(t.device)[t], self.min_snr_gamma)
        return loss.mean()


def min_snr_weight(abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight for ε-prediction, min(SNR, γ) / SNR (Hang et al. 2023): the nearly clean steps,
    whose ε is easy and whose gradients otherwise dominate, count less; convergence is several times faster."""
    snr = abar / (1 - abar)
    return gamma / snr.clamp(min=gamma)  # = 1 where SNR ≤ γ (also at SNR = 0)


def initial_weights(init: str) -> dict[str, torch.Tensor]:
    """A training run's ``model.safetensors``, or a whole exported model (a registered name such as ``nano`` or
    a native folder) as the trainable's state dict, so a fine-tune can start from the committed weights."""
    if Path(init).is_file():
        return load_file(init)
    from ...checkpoints.loading import load_components

    components = load_components(init)
    text = components.text_encoder
    weights = {f"unet.{k}": v for k, v in components.unet.state_dict().items()}
    weights.update({f"text.encoder.{k}": v for k, v in text.encoder.state_dict().items()})
    weights.update({f"text.projection.{k}": v for k, v in text.projection.state_dict().items()})
    weights["null_embedding"] = text.null_embedding
    return weights


class DiffusionRecipe(Recipe):
    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        m = cfg.model
        self.unet_config = UNetConfig.from_dict(m.get("unet", {}))
        self.movq = load_movq_export(m["movq"]).to(device)
        torch.manual_seed(cfg.seed)
        tokenizer, t5 = build_text_encoder(m.get("text_encoder", {}), self.unet_config.context_dim)
        projection = make_projection(t5.config.d_model, self.unet_config.context_dim)
        text = TextEncoder(tokenizer, t5, projection, None)
        self.trainable = DiffusionTrainable(UNet(self.unet_config), text, m.get("train_text_encoder", True),
                                            m.get("min_snr_gamma"))
        if m.get("init"):  # start from other weights (e.g. to adapt a U-Net to a fine-tuned MoVQ)
            weights, what = initial_weights(m["init"]), f"diffusion weights in {m['init']}"
            if m.get("grow"):  # the config adds attention blocks / T5 layers: they start as identities
                grown = grow_into(self.trainable, weights, what)
                print(f"grown from {m['init']}: {len(grown)} new blocks start as identities")
            else:
                load_into(self.trainable, weights, what)
        self.variant = Variant(m.get("name", "custom"), m.get("description", "trained with kandinsky3 train"),
                               self.unet_config, self.movq.config, SamplerDefaults(**m.get("sampler", {})),
                               size=cfg.data.size, hub_repo=None, movq_file=None, text_encoder_dir=None)
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
        key = hashlib.sha256()
        for name, value in self.movq.state_dict().items():
            if name.startswith(("encoder.", "quant_conv.")):
                key.update(name.encode() + value.float().cpu().numpy().tobytes())
        key.update(images.contiguous().numpy())
        cache = Path(self.cfg.output_dir) / f"latents-{key.hexdigest()[:16]}.safetensors"
        if cache.is_file():
            tensors["latents"] = load_file(cache)["latents"]
            return
        tensors["latents"] = torch.cat([self.movq.encode_untiled(chunk.to(self.device)).cpu()
                                        for chunk in images.split(256)])
        if int(os.environ.get("RANK", "0")) == 0:
            save_safetensors({"latents": tensors["latents"]}, cache)

    def prepare(self, batch):
        text = self.trainable.text if not hasattr(self.trainable, "module") else self.trainable.module.text
        ids, mask = (batch["ids"], batch["mask"]) if "ids" in batch else text.tokenize(batch["caption"])
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
        else:
            with torch.no_grad():
                latents = self.movq.encode(batch["image"].to(self.device)).float()
        drop = torch.rand(len(batch["caption"])) < self.cfg.cfg_dropout
        return {"ids": ids.to(self.device), "mask": mask.to(self.device), "latents": latents,
                "drop": drop.to(self.device)}

    def enable_gradient_checkpointing(self):
        self.trainable.unet.gradient_checkpointing = True

    def pipeline(self, module):
        from ...pipeline import Kandinsky3

        text = TextEncoder(module.text.tokenizer, module.text.encoder, module.text.projection,
                           module.null_embedding.detach())
        return Kandinsky3(Components(self.variant, module.unet, self.movq, text), device=self.device)

    @torch.no_grad()
    def sample_grid(self, module):
        was_training = module.training
        module.eval()
        pipe = self.pipeline(module)
        rows = [pipe.generate(SAMPLE_PROMPTS, seed=0, steps=25, progress=False),
                pipe.generate(SAMPLE_PROMPTS, seed=1, steps=25, progress=False)]
        module.train(was_training)
        return image_grid(rows)

    def export(self, module, path):
        module.eval()
        pipe = self.pipeline(module)
        dtype = parse_dtype(self.cfg.model.get("export_dtype"), None)  # fp16 keeps the committed nano small
        save_components(Components(self.variant, pipe.unet, pipe.movq, pipe.text_encoder), Path(path), "native",
                        dtype)
