"""The IP-Adapter's image encoder (spec §8.2): a ``transformers`` CLIP vision tower with its projection.

The released adapter reads ``CLIPVisionModelWithProjection(...).image_embeds`` — the projected, pooled embedding
(B, D), D = 768 for CLIP ViT-L/14 — of images prepared by a ``CLIPImageProcessor``. The unconditional image
feature is the embedding of an all-zero *normalised* image (the processor's mean colour), as released.

The nano family's CLIP is a small ``CLIPModel`` (vision + text towers, :func:`nano_clip_config`) over nano's
word-level tokenizer, trained contrastively on the shapes world (``training/recipes/clip.py``); its vision tower
loads here like the released one.
"""

from __future__ import annotations

import torch
from torch import nn


def nano_clip_config(
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    vision_layers: int = 4,
    text_layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    max_text_length: int = 64,
):
    """A ``CLIPConfig`` of the nano family's shape: a ViT of ``vision_layers`` over (image_size/patch_size)² patches
    and a text transformer over the word-level tokenizer (pad 0, EOS 1: pooling reads the first EOS)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        projection_dim=projection_dim,
    )
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        max_position_embeddings=max_text_length,
        projection_dim=projection_dim,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)


def image_processor_class():
    """``CLIPImageProcessor``, or where torchvision is not installed its PIL implementation, which transformers ≥ 5
    falls back to anyway — importing it by name spares every user the fallback's warning."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def nano_image_processor(image_size: int = 64):
    """The ``CLIPImageProcessor`` of the nano CLIP: OpenAI CLIP's mean/std, bicubic resize of the short side, centre
    crop, at ``image_size`` (a 64-px render passes through unresized)."""
    return image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


class ImageEncoder(nn.Module):
    """``CLIPVisionModelWithProjection`` + its ``CLIPImageProcessor``: images → ``image_embeds`` (B, D).

    ``vision``: the vision tower with projection; ``processor``: the image processor (resize, crop, normalise).
    """

    def __init__(self, vision: nn.Module, processor):
        super().__init__()
        self.vision = vision
        self.processor = processor

    @property
    def embed_dim(self) -> int:
        return self.vision.config.projection_dim

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def pixel_values(self, images) -> torch.Tensor:
        """RGB images (PIL) → normalised pixel values (B, 3, S, S) by the processor."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, S, S) at the encoder's size → normalised pixel values, as the processor would
        give for the same 8-bit picture (training feeds renders as tensors)."""
        mean = torch.tensor(self.processor.image_mean, device=images.device, dtype=images.dtype)[None, :, None, None]
        std = torch.tensor(self.processor.image_std, device=images.device, dtype=images.dtype)[None, :, None, None]
        return ((images + 1) / 2 - mean) / std

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixel values → ``image_embeds`` (B, D) in fp32."""
        out = self.vision(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.image_embeds.float()

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """PIL images → ``image_embeds`` (B, D), fp32."""
        return self(self.pixel_values(images))

    @torch.no_grad()
    def zero_embedding(self) -> torch.Tensor:
        """The unconditional image feature (1, D): the embedding of an all-zero normalised image (released)."""
        zeros = torch.zeros(1, 3, self.image_size, self.image_size)
        return self(zeros)


def clip_embedders(clip, tokenizer, processor):
    """(embed_images, embed_texts) of a ``CLIPModel``: PIL images / strings → projected features (N, D), fp32."""

    def features(out):
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 4 → tensor, 5 → output

    param = next(clip.parameters())

    @torch.no_grad()
    def images(pil_images):
        pixels = processor(images=list(pil_images), return_tensors="pt")["pixel_values"]
        return features(clip.get_image_features(pixel_values=pixels.to(param.device, param.dtype))).float()

    @torch.no_grad()
    def texts(strings):
        enc = tokenizer(list(strings), padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = clip.get_text_features(
            input_ids=enc["input_ids"].to(param.device), attention_mask=enc["attention_mask"].to(param.device)
        )
        return features(out).float()

    return images, texts
