"""MoVQ autoencoder (spec §5): encoder, spatially-normalised decoder, no quantiser at inference.

Attribute names follow the official ``kandinsky3/movq.py`` so ``movq.pt`` loads with ``strict=True``.
Tiled encode / decode (spec §5.4) bounds memory on large images; it is the KandiSuperRes copy's behaviour and off
by default, as in the official Kandinsky 3 pipelines, which code and decode any size whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FrozenConfig
from .tiles import tiled_map


@dataclass(frozen=True)
class MoVQConfig(FrozenConfig):
    """The official generator config (``get_movq``) plus the KandiSuperRes tiling keys (``use_tiling`` off: the K3
    pipelines never tile; KandiSuperRes asks for tiles explicitly)."""

    _tuple_fields = ("ch_mult", "attn_resolutions")

    ch: int = 256
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    dropout: float = 0.0
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 4
    double_z: bool = False
    embed_dim: int = 4
    num_groups: int = 32
    tile_sample_min_size: int = 1024
    tile_overlap_factor_enc: float = 0.0
    tile_overlap_factor_dec: float = 0.25
    use_tiling: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


class SpatialNorm(nn.Module):
    """GroupNorm, modulated by the (nearest-resized) latent ``zq`` in the decoder; plain GroupNorm in the encoder."""

    def __init__(self, channels: int, zq_channels: int | None, num_groups: int = 32):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)
        if zq_channels is not None:
            self.conv_y = nn.Conv2d(zq_channels, channels, 1)
            self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        norm_f = self.norm_layer(f)
        if zq is None:
            return norm_f
        (h, w), (zh, zw) = f.shape[-2:], zq.shape[-2:]
        if h % zh or w % zw:  # not a whole-number upsampling
            return self.modulate_in_official_order(norm_f, zq)
        # Nearest upsampling by whole factors repeats pixels, so it commutes with the 1×1 convolutions: modulate at
        # zq's resolution and broadcast over each s×s block, instead of running two zq_channels → C convolutions at
        # full resolution and materialising their outputs (the decoder's top level: 7 norms on 1024² × 256 maps).
        n, c = norm_f.shape[:2]
        blocks = norm_f.reshape(n, c, zh, h // zh, zw, w // zw)
        scale = self.conv_y(zq)[:, :, :, None, :, None]
        shift = self.conv_b(zq)[:, :, :, None, :, None]
        return torch.addcmul(shift, blocks, scale).reshape(n, c, h, w)

    def modulate_in_official_order(self, norm_f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """zq resized to the feature map first, then the 1×1 convolutions at full resolution (the official code)."""
        zq = F.interpolate(zq, size=norm_f.shape[-2:], mode="nearest")
        return norm_f * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, zq_channels: int | None, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = SpatialNorm(in_channels, zq_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SpatialNorm(out_channels, zq_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, zq=None):
        h = self.conv1(nonlinearity(self.norm1(x, zq)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h, zq))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 conv projections (scale C^-0.5), via SDPA."""

    def __init__(self, channels: int, zq_channels: int | None, num_groups: int):
        super().__init__()
        self.norm = SpatialNorm(channels, zq_channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, zq=None):
        b, c, h, w = x.shape
        n = self.norm(x, zq)

        def tokens(t):  # (B, 1, HW, C)
            return t.reshape(b, c, h * w).transpose(1, 2)[:, None]

        out = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block``, ``attn`` and an optional ``downsample``/``upsample`` (official names)."""


class _Mid(nn.Module):
    def __init__(self, channels, zq_channels, dropout, num_groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, zq_channels, dropout, num_groups)
        self.attn_1 = AttnBlock(channels, zq_channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, zq_channels, dropout, num_groups)

    def forward(self, x, zq=None):
        return self.block_2(self.attn_1(self.block_1(x, zq), zq), zq)


class Encoder(nn.Module):
    def __init__(self, config: MoVQConfig):
        super().__init__()
        c, g = config, config.num_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_mult = (1,) + c.ch_mult
        res = c.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            level = _Level()
            block_in, block_out = c.ch * in_mult[i], c.ch * mult
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, None, c.dropout, g))
                block_in = block_out
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, None, g))
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, None, c.dropout, g)
        self.norm_out = SpatialNorm(block_in, None, g)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: MoVQConfig):
        super().__init__()
        c, g, zq = config, config.num_groups, config.embed_dim
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (len(c.ch_mult) - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, zq, c.dropout, g)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            level = _Level()
            block_out = c.ch * c.ch_mult[i]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, zq, c.dropout, g))
                block_in = block_out
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, zq, g))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level: up[-1] is the lowest resolution, run first
        self.norm_out = SpatialNorm(block_in, zq, g)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z, zq):
        h = self.mid(self.conv_in(z), zq)
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h, zq)
                if len(level.attn):
                    h = level.attn[i](h, zq)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h, zq)))


class MoVQ(nn.Module):
    """``encode``: image in [-1, 1] (B,3,H,W) → latent (B,4,H/8,W/8); ``decode``: latent → image (unclipped).

    No latent scaling factor is applied anywhere (spec §4.1).
    """

    def __init__(self, config: MoVQConfig | None = None, **overrides):
        super().__init__()
        self.config = config = MoVQConfig.with_overrides(config, overrides)
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    # -- plain ------------------------------------------------------------------------------------------------

    def encode_untiled(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z), zq=z)

    # -- tiled (spec §5.4) ------------------------------------------------------------------------------------

    @property
    def tile_latent_size(self) -> int:
        return self.config.tile_sample_min_size // self.config.downsample_factor

    def encode(self, x: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """``tiled``: None → the config's ``use_tiling``; tiles are used only where a side exceeds one tile."""
        tile = self.config.tile_sample_min_size
        tiled = self.config.use_tiling if tiled is None else tiled
        if not tiled or max(x.shape[-2:]) <= tile:
            return self.encode_untiled(x)
        stride = int(tile * (1 - self.config.tile_overlap_factor_enc))
        keep = int(self.tile_latent_size * (1 - self.config.tile_overlap_factor_enc)) or self.tile_latent_size
        rows = []
        for i in range(0, x.shape[-2], stride):
            row = [
                self.encode_untiled(x[..., i : i + tile, j : j + tile])[..., :keep, :keep]
                for j in range(0, x.shape[-1], stride)
            ]
            rows.append(torch.cat(row, dim=-1))
        return torch.cat(rows, dim=-2)

    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """``tiled``: None → the config's ``use_tiling``; tiles are used only where a side exceeds one tile."""
        tile = self.tile_latent_size
        tiled = self.config.use_tiling if tiled is None else tiled
        if not tiled or max(z.shape[-2:]) <= tile:
            return self.decode_untiled(z)
        stride = int(tile * (1 - self.config.tile_overlap_factor_dec))
        return tiled_map(z, self.decode_untiled, tile, stride, self.config.downsample_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
