"""The latent discriminator of Flash's Adversarial Diffusion Distillation (ADD, arXiv 2311.17042, as the Kandinsky
3.0 Flash authors adapted it).

Decoding to pixels and back-propagating through the MoVQ does not fit at 1024², so the discriminator works on
latents: its feature network is the **frozen down-sampling half of the teacher U-Net** (time embedding with the
text pooling, ``in_layer``, every down level), and after each down level sits one light **trainable head**
(conv → GroupNorm → SiLU → cross-attention to the projected text tokens → 1×1 conv to a logit map). The logit maps
are averaged over space, then over the heads: one score per sample.

The frozen half keeps ``requires_grad=False`` but stays in the graph: the generator's loss and the gradient penalty
differentiate through it with respect to its input.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from .unet import Attention, UNet


class FrozenEncoder(nn.Module):
    """A frozen copy of a U-Net's time embedding, text pooling, ``in_layer`` and down levels; ``forward`` returns
    the features after every down level (the U-Net's own parameter names under ``backbone.``)."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.config = unet.config
        self.to_time_embed = copy.deepcopy(unet.to_time_embed)
        self.feature_pooling = copy.deepcopy(unet.feature_pooling)
        self.in_layer = copy.deepcopy(unet.in_layer)
        self.down_samples = copy.deepcopy(unet.down_samples)
        self.requires_grad_(False)

    @property
    def level_channels(self) -> list[int]:
        return [self.config.model_channels * m for m in self.config.dim_mult]

    def train(self, mode: bool = True):  # frozen: dropout and friends stay in eval mode
        return super().train(False)

    def forward(self, x, time, context=None, context_mask=None, context_lengths=None) -> list[torch.Tensor]:
        time_embed = UNet.time_embedding(self, time, context, context_mask, context_lengths)
        x = self.in_layer(x)
        features = []
        for level in self.down_samples:
            x = level(x, time_embed, context, context_mask)
            features.append(x)
        return features


class DiscriminatorHead(nn.Module):
    """conv3×3 → GroupNorm → SiLU → [+ cross-attention to the text tokens] → 1×1 conv to a (B, 1, h, w) logit map."""

    def __init__(self, channels: int, width: int, context_dim: int | None, groups: int, head_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(groups, width)
        self.act = nn.SiLU()
        self.attention = Attention(width, width, context_dim, head_dim) if context_dim else None
        self.to_logits = nn.Conv2d(width, 1, 1)

    def forward(self, features, context=None, context_mask=None) -> torch.Tensor:
        h = self.act(self.norm(self.conv(features)))
        if self.attention is not None:
            b, c, hh, ww = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            h = h + self.attention(tokens, context, context_mask).transpose(1, 2).reshape(b, c, hh, ww)
        return self.to_logits(h)


class LatentDiscriminator(nn.Module):
    """``D(x_t, t, context, context_mask) → (B,)`` scores: the frozen teacher down half + one head per level.

    ``text_attention=False`` gives heads without cross-attention (the ablation of the text-conditioned heads);
    ``head_width`` is each head's channel count; its GroupNorm groups and attention head width default to the
    teacher's where they divide it.
    """

    def __init__(
        self,
        teacher: UNet,
        head_width: int = 256,
        text_attention: bool = True,
        groups: int | None = None,
        head_dim: int | None = None,
    ):
        super().__init__()
        self.backbone = FrozenEncoder(teacher)
        cfg = teacher.config
        groups = groups or math.gcd(cfg.groups, head_width)
        head_dim = head_dim or math.gcd(cfg.head_dim, head_width)
        context_dim = cfg.context_dim if text_attention else None
        self.heads = nn.ModuleList(
            DiscriminatorHead(c, head_width, context_dim, groups, head_dim) for c in self.backbone.level_channels
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def forward(self, x, time, context=None, context_mask=None, context_lengths=None) -> torch.Tensor:
        features = self.backbone(x, time, context, context_mask, context_lengths)
        scores = [head(f, context, context_mask).mean(dim=(1, 2, 3)) for head, f in zip(self.heads, features)]
        return torch.stack(scores).mean(0)


def parameter_counts(discriminator: LatentDiscriminator) -> dict[str, int]:
    """``frozen`` (the teacher's down half) and ``heads`` (trainable) parameter counts."""
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    return {"frozen": count(discriminator.backbone.parameters()), "heads": count(discriminator.heads.parameters())}


__all__: Sequence[str] = ["DiscriminatorHead", "FrozenEncoder", "LatentDiscriminator", "parameter_counts"]
