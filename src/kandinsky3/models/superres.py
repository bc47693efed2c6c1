"""KandiSuperRes EfficientUNet (spec §7.1): pixel-space, predicts the clean high-res image x0.

Attribute names follow the official ``KandiSuperRes/model/unet_sr.py`` so ``KandiSuperRes*.ckpt`` loads with
``strict=True``. No attention anywhere: the network is fully convolutional, so it runs on any window size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FrozenConfig
from .movq import MoVQ
from .unet import SinusoidalPosEmb, UNet


@dataclass(frozen=True)
class SuperResUNetConfig(FrozenConfig):
    _tuple_fields = ("dim_mult", "num_resnet_blocks")

    init_channels: int = 128
    model_channels: int = 128
    num_channels: int = 3
    time_embed_dim: int = 512
    groups: int = 32
    dim_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_resnet_blocks: tuple[int, ...] = (2, 4, 8, 8)
    dropout: float = 0.1
    skip_connect_scale: float = 1.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class UpDownResolution(nn.Module):
    """'conv' resampling: Conv2d(k4, s2, p1) down, ConvTranspose2d(k4, s2, p1) up (key ``change_resolution``)."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        cls = nn.ConvTranspose2d if up else nn.Conv2d
        self.change_resolution = cls(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x):
        return self.change_resolution(x)


class Block(nn.Module):
    """GroupNorm → [·(1+scale)+shift] → [SiLU] → [Dropout] → [resample] → Conv3×3."""

    def __init__(
        self,
        in_channels,
        out_channels,
        groups,
        activation: bool,
        dropout: float = 0.0,
        up_resolution: bool | None = None,
    ):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, in_channels)
        self.activation = nn.SiLU() if activation else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.change_resolution = (
            UpDownResolution(in_channels, up_resolution) if up_resolution is not None else nn.Identity()
        )
        self.projection = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x, scale_shift=None):
        x = self.group_norm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1.0) + shift
        x = self.dropout(self.activation(x))
        return self.projection(self.change_resolution(x))


class ResNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_embed_dim, groups, dropout, up_resolution: bool | None = None):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * out_channels))
        self.in_block = Block(in_channels, out_channels, groups, activation=False, up_resolution=up_resolution)
        self.out_block = Block(out_channels, out_channels, groups, activation=True, dropout=dropout)
        self.change_resolution = (
            UpDownResolution(in_channels, up_resolution) if up_resolution is not None else nn.Identity()
        )
        resampled = up_resolution is not None
        self.res_block = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels or resampled else nn.Identity()
        )

    def forward(self, x, time_embed):
        scale_shift = self.time_mlp(time_embed)[:, :, None, None].chunk(2, dim=1)
        out = self.out_block(self.in_block(x), scale_shift)
        return out + self.res_block(self.change_resolution(x))


class _Level(nn.Module):
    """``resnet_attn_blocks.{i}`` = [ResNetBlock, Identity] (the attention slot never has parameters)."""

    def __init__(self, pairs, time_embed_dim, groups, dropout, resample_index: int | None, up: bool):
        super().__init__()
        self.resnet_attn_blocks = nn.ModuleList(
            nn.ModuleList(
                [ResNetBlock(a, b, time_embed_dim, groups, dropout, up if i == resample_index else None), nn.Identity()]
            )
            for i, (a, b) in enumerate(pairs)
        )

    def forward(self, x, time_embed):
        for resnet, _ in self.resnet_attn_blocks:
            x = resnet(x, time_embed)
        return x


class SuperResUNet(nn.Module):
    """``forward(x_t (B,3,H,W), time (B,), lowres (B,3,h,w)) → x0 (B,3,H,W)``; H, W multiples of 8."""

    def __init__(self, config: SuperResUNetConfig | None = None, **overrides):
        super().__init__()
        self.config = c = SuperResUNetConfig.with_overrides(config, overrides)
        te = c.time_embed_dim
        self.to_time_embed = nn.Sequential(
            SinusoidalPosEmb(c.init_channels), nn.Linear(c.init_channels, te), nn.SiLU(), nn.Linear(te, te)
        )
        self.init_conv = nn.Conv2d(2 * c.num_channels, c.init_channels, 3, padding=1)
        hidden = [c.init_channels] + [c.model_channels * m for m in c.dim_mult]
        in_out = list(zip(hidden[:-1], hidden[1:]))
        levels = len(in_out)
        self.down_samples = nn.ModuleList()
        cat_dims = []
        for level, ((a, b), n) in enumerate(zip(in_out, c.num_resnet_blocks)):
            last = level == levels - 1
            cat_dims.append(0 if last else b)
            pairs = [(a, b)] + [(b, b)] * (n - 1)
            self.down_samples.append(_Level(pairs, te, c.groups, c.dropout, None if last else 0, up=False))
        self.up_samples = nn.ModuleList()
        for level, ((b, a), n) in enumerate(zip(reversed(in_out), reversed(c.num_resnet_blocks))):
            cat = cat_dims.pop()
            pairs = [(a + cat, a)] + [(a, a)] * (n - 2) + [(a, b)]
            self.up_samples.append(_Level(pairs, te, c.groups, c.dropout, None if level == 0 else n - 1, up=True))
        self.norm = nn.GroupNorm(c.groups, c.init_channels)
        self.out_conv = nn.Conv2d(c.init_channels, c.num_channels, 3, padding=1)

    def forward(self, x, time, lowres):
        sinusoid = self.to_time_embed[0](time.float()).to(self.to_time_embed[1].weight.dtype)
        time_embed = self.to_time_embed[1:](sinusoid)
        lowres = F.interpolate(lowres.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.init_conv(torch.cat([x, lowres], dim=1))
        skips = []
        for level, down in enumerate(self.down_samples):
            x = down(x, time_embed)
            if level != len(self.down_samples) - 1:
                skips.append(x)
        for level, up in enumerate(self.up_samples):
            if level != 0:
                x = torch.cat([x, skips.pop() / self.config.skip_connect_scale], dim=1)
            x = up(x, time_embed)
        return self.out_conv(F.silu(self.norm(x)))


# -- KandiSuperRes Flash refine parts (spec §7.4) ---------------------------------------------------------------


@dataclass
class RefineParts:
    """Flash refine: the K3 Flash U-Net, the MoVQ, and the (projected, uncropped) empty-prompt context."""

    unet: UNet
    movq: MoVQ
    context: torch.Tensor  # (1, L, D)
    context_mask: torch.Tensor  # (1, L)
    tile: int = 352
    stride: int = 264
    timestep: int = 229


def refine_context_from_text_encoder(text_encoder, length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The refine context of the reference files, computed: the empty prompt through T5, padding zeroed *before*
    the projection (so pads hold the LayerNorm bias), uncropped, only position 0 attended."""
    ids, mask = text_encoder.tokenize([""])
    with torch.no_grad():
        hidden = text_encoder.encoder(
            input_ids=ids.to(text_encoder.device), attention_mask=mask.to(text_encoder.device)
        ).last_hidden_state
        hidden = hidden * mask.to(hidden)[..., None]
        context = text_encoder.projection(hidden.to(text_encoder.projection[0].weight.dtype))
    return context[:, :length].cpu(), mask[:, :length]
