"""The Kandinsky 3 latent U-Net (spec §3), with the official state-dict key names.

Module attribute names mirror the official ``kandinsky3/model/unet.py`` and ``nn.py`` so an official
``kandinsky3*.pt`` ``unet`` dict loads with ``strict=True``. Attention runs through
``scaled_dot_product_attention`` with the official hard-mask semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FrozenConfig


@dataclass(frozen=True)
class UNetConfig(FrozenConfig):
    """Constructor arguments of the official ``UNet`` (same names, same meaning)."""

    _tuple_fields = ("dim_mult", "num_blocks", "add_cross_attention", "add_self_attention")

    model_channels: int = 384
    init_channels: int | None = 192
    num_channels: int = 4
    out_channels: int = 4
    time_embed_dim: int | None = 1536
    context_dim: int | None = 4096
    groups: int = 32
    head_dim: int = 64
    expansion_ratio: int = 4
    compression_ratio: int = 2
    dim_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_blocks: tuple[int, ...] = (3, 3, 3, 3)
    add_cross_attention: tuple[bool, ...] = (False, True, True, True)
    add_self_attention: tuple[bool, ...] = (False, True, True, True)

    def __post_init__(self):
        super().__post_init__()
        levels = {len(self.dim_mult), len(self.num_blocks), len(self.add_cross_attention), len(self.add_self_attention)}
        if len(levels) != 1:
            raise ValueError(
                "dim_mult, num_blocks, add_cross_attention and add_self_attention need one entry per level"
            )
        if min(self.num_blocks) < 2:
            raise ValueError(
                f"num_blocks must be ≥ 2 per level (an up level maps in+cat → in → out), got {self.num_blocks}"
            )

    @property
    def resolved_init_channels(self) -> int:
        return self.init_channels or self.model_channels

    @property
    def resolved_time_embed_dim(self) -> int:
        return self.time_embed_dim or self.model_channels * 4

    @property
    def downsample_factor(self) -> int:
        """How much smaller the deepest feature map is than the latent."""
        return 2 ** (len(self.dim_mult) - 1)


# --------------------------------------------------------------------------------------------------------------
# building blocks (official names)


class SinusoidalPosEmb(nn.Module):
    """[sin(t·f), cos(t·f)] with f_j = exp(-j·ln(10000)/(half-1)); computed in the dtype of ``t``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -scale)
        angles = t[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class ConditionalGroupNorm(nn.Module):
    """GroupNorm without affine, then ``x·(1+scale) + shift`` from the time embedding."""

    def __init__(self, groups: int, normalized_shape: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, normalized_shape, affine=False)
        self.context_mlp = nn.Sequential(nn.SiLU(), nn.Linear(context_dim, 2 * normalized_shape))
        nn.init.zeros_(self.context_mlp[1].weight)
        nn.init.zeros_(self.context_mlp[1].bias)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        scale, shift = self.context_mlp(time_embed)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (scale + 1.0) + shift


def hard_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over (B, heads, L, d) tensors with the official hard key mask.

    The official code fills masked logits with ``-finfo.max``; a row whose keys are *all* masked therefore gets a
    uniform softmax (the mean of the values). SDPA would give NaN there, so such rows get an all-True mask and a
    zeroed query, which yields exactly the same uniform weights. The fix is applied to every row (a no-op where a key
    is attended: ``q·1``, ``mask | False``) so that no value is read back to the host: CUDA graphs and
    ``torch.compile`` see one graph.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    mask = mask.bool()
    attended = mask.any(dim=-1)  # (B,)
    mask = mask | ~attended[:, None]
    q = q * attended[:, None, None, None].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


class Attention(nn.Module):
    """Multi-head attention without biases; heads = out_channels / head_dim.

    A text cross-attention layer may also read **image tokens** (IP-Adapter, spec §8.2): an attached
    ``models.ip_adapter.IPAttention`` (``self.ip``, borrowed from the adapter, not a submodule of the U-Net, so the
    U-Net's state dict stays the official one) adds ``image_weight · to_out_ip(attention(q, image tokens))`` with the
    same query and heads. Without ``image_tokens`` the layer computes exactly what it always did.
    """

    ip = None  # the attached IP-Adapter layer (models.ip_adapter.IPAttention), if any

    def __init__(self, in_channels: int, out_channels: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        if out_channels % head_dim:
            raise ValueError(f"attention width {out_channels} is not a multiple of head_dim {head_dim}")
        self.num_heads = out_channels // head_dim
        self.to_query = nn.Linear(in_channels, out_channels, bias=False)
        self.to_key = nn.Linear(context_dim, out_channels, bias=False)
        self.to_value = nn.Linear(context_dim, out_channels, bias=False)
        self.output_layer = nn.Linear(out_channels, out_channels, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        image_weight=None,
    ) -> torch.Tensor:
        q, k, v = self._heads(self.to_query(x)), self._heads(self.to_key(context)), self._heads(self.to_value(context))
        out = hard_mask_attention(q, k, v, context_mask)  # (B, heads, Lq, d)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        out = self.output_layer(out)
        if image_tokens is not None:
            if self.ip is None:
                raise RuntimeError("image_tokens given, but no IP-Adapter is attached to this U-Net (IPAdapter.attach)")
            out = out + self.ip(q, image_tokens, image_weight)
        return out


class Block(nn.Module):
    def __init__(self, in_channels, out_channels, time_embed_dim, kernel_size=3, norm_groups=32, up_resolution=None):
        super().__init__()
        self.group_norm = ConditionalGroupNorm(norm_groups, in_channels, time_embed_dim)
        self.activation = nn.SiLU()
        self.up_sample = (
            nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
            if up_resolution is True
            else nn.Identity()
        )
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size, padding=int(kernel_size > 1))
        self.down_sample = (
            nn.Conv2d(out_channels, out_channels, kernel_size=2, stride=2) if up_resolution is False else nn.Identity()
        )

    def forward(self, x, time_embed):
        x = self.activation(self.group_norm(x, time_embed))
        return self.down_sample(self.projection(self.up_sample(x)))


class ResNetBlock(nn.Module):
    """BigGAN-deep bottleneck: 1×1 → 3×3 → 3×3 → 1×1, optional up/down resampling, unscaled residual sum."""

    def __init__(
        self,
        in_channels,
        out_channels,
        time_embed_dim,
        norm_groups=32,
        compression_ratio=2,
        up_resolutions=(None, None, None, None),
    ):
        super().__init__()
        hidden = max(in_channels, out_channels) // compression_ratio
        pairs = [(in_channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, out_channels)]
        self.resnet_blocks = nn.ModuleList(
            Block(a, b, time_embed_dim, k, norm_groups, r) for (a, b), k, r in zip(pairs, (1, 3, 3, 1), up_resolutions)
        )
        ups = True in up_resolutions
        downs = False in up_resolutions
        self.shortcut_up_sample = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2) if ups else nn.Identity()
        self.shortcut_projection = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )
        self.shortcut_down_sample = nn.Conv2d(out_channels, out_channels, 2, stride=2) if downs else nn.Identity()

    def forward(self, x, time_embed):
        out = x
        for block in self.resnet_blocks:
            out = block(out, time_embed)
        x = self.shortcut_down_sample(self.shortcut_projection(self.shortcut_up_sample(x)))
        return x + out


class AttentionPolling(nn.Module):
    """Pools the text context into one vector added to the time embedding (official spelling kept)."""

    def __init__(self, num_channels: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        self.attention = Attention(context_dim, num_channels, context_dim, head_dim)

    def forward(self, x, context, context_mask=None, context_lengths=None):
        if context_lengths is None:
            query = context.mean(dim=1, keepdim=True)
        else:  # per-sample crop length: a batch of prompts pools as each prompt would alone (zeros beyond)
            query = context.sum(dim=1, keepdim=True) / context_lengths.to(context.dtype)[:, None, None]
        pooled = self.attention(query, context, context_mask)
        return x + pooled.squeeze(1)


class AttentionBlock(nn.Module):
    def __init__(self, num_channels, time_embed_dim, context_dim=None, norm_groups=32, head_dim=64, expansion_ratio=4):
        super().__init__()
        self.in_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.attention = Attention(num_channels, num_channels, context_dim or num_channels, head_dim)
        hidden = expansion_ratio * num_channels
        self.out_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.feed_forward = nn.Sequential(
            nn.Conv2d(num_channels, hidden, 1, bias=False), nn.SiLU(), nn.Conv2d(hidden, num_channels, 1, bias=False)
        )

    def forward(self, x, time_embed, context=None, context_mask=None, image_tokens=None, image_weight=None):
        b, c, h, w = x.shape
        tokens = self.in_norm(x, time_embed).flatten(2).transpose(1, 2)  # (B, HW, C)
        if context is None:
            out = self.attention(tokens, tokens, None)
        elif image_tokens is None:
            out = self.attention(tokens, context, context_mask)
        else:
            out = self.attention(tokens, context, context_mask, image_tokens, image_weight)
        x = x + out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.feed_forward(self.out_norm(x, time_embed))


class DownSampleBlock(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        time_embed_dim,
        context_dim=None,
        num_blocks=3,
        groups=32,
        head_dim=64,
        expansion_ratio=4,
        compression_ratio=2,
        down_sample=True,
        self_attention=True,
    ):
        super().__init__()
        self.self_attention_block = (
            AttentionBlock(in_channels, time_embed_dim, None, groups, head_dim, expansion_ratio)
            if self_attention
            else nn.Identity()
        )
        patterns = [[None] * 4] * (num_blocks - 1) + [[None, None, False if down_sample else None, None]]
        widths = [(in_channels, out_channels)] + [(out_channels, out_channels)] * (num_blocks - 1)
        self.resnet_attn_blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    ResNetBlock(a, b, time_embed_dim, groups, compression_ratio),
                    AttentionBlock(b, time_embed_dim, context_dim, groups, head_dim, expansion_ratio)
                    if context_dim is not None
                    else nn.Identity(),
                    ResNetBlock(b, b, time_embed_dim, groups, compression_ratio, pattern),
                ]
            )
            for (a, b), pattern in zip(widths, patterns)
        )

    def forward(self, x, time_embed, context=None, context_mask=None, image_tokens=None, image_weight=None):
        if not isinstance(self.self_attention_block, nn.Identity):
            x = self.self_attention_block(x, time_embed)
        for resnet_in, attention, resnet_out in self.resnet_attn_blocks:
            x = resnet_in(x, time_embed)
            if not isinstance(attention, nn.Identity):
                x = attention(x, time_embed, context, context_mask, image_tokens, image_weight)
            x = resnet_out(x, time_embed)
        return x


class UpSampleBlock(nn.Module):
    def __init__(
        self,
        in_channels,
        cat_dim,
        out_channels,
        time_embed_dim,
        context_dim=None,
        num_blocks=3,
        groups=32,
        head_dim=64,
        expansion_ratio=4,
        compression_ratio=2,
        up_sample=True,
        self_attention=True,
    ):
        super().__init__()
        patterns = [[None, True if up_sample else None, None, None]] + [[None] * 4] * (num_blocks - 1)
        widths = (
            [(in_channels + cat_dim, in_channels)]
            + [(in_channels, in_channels)] * (num_blocks - 2)
            + [(in_channels, out_channels)]
        )
        self.resnet_attn_blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    ResNetBlock(a, a, time_embed_dim, groups, compression_ratio, pattern),
                    AttentionBlock(a, time_embed_dim, context_dim, groups, head_dim, expansion_ratio)
                    if context_dim is not None
                    else nn.Identity(),
                    ResNetBlock(a, b, time_embed_dim, groups, compression_ratio),
                ]
            )
            for (a, b), pattern in zip(widths, patterns)
        )
        self.self_attention_block = (
            AttentionBlock(out_channels, time_embed_dim, None, groups, head_dim, expansion_ratio)
            if self_attention
            else nn.Identity()
        )

    def forward(self, x, time_embed, context=None, context_mask=None, image_tokens=None, image_weight=None):
        for resnet_in, attention, resnet_out in self.resnet_attn_blocks:
            x = resnet_in(x, time_embed)
            if not isinstance(attention, nn.Identity):
                x = attention(x, time_embed, context, context_mask, image_tokens, image_weight)
            x = resnet_out(x, time_embed)
        if not isinstance(self.self_attention_block, nn.Identity):
            x = self.self_attention_block(x, time_embed)
        return x


# --------------------------------------------------------------------------------------------------------------


class TimeConditioned:
    """The time embedding of the U-Net and of its ControlNet copy (same parameter names, ``to_time_embed`` and
    ``feature_pooling``): a sinusoid and an MLP, pooled with the text tokens when there are any."""

    def init_time_layers(self, config: UNetConfig):
        init_channels, te = config.resolved_init_channels, config.resolved_time_embed_dim
        self.to_time_embed = nn.Sequential(
            SinusoidalPosEmb(init_channels), nn.Linear(init_channels, te), nn.SiLU(), nn.Linear(te, te)
        )
        self.feature_pooling = AttentionPolling(te, config.context_dim, config.head_dim) if config.context_dim else None

    def time_embedding(self, time, context=None, context_mask=None, context_lengths=None):
        # the sinusoid is computed in fp32 (t up to 999 does not survive bf16), the MLP in the weights' dtype
        sinusoid = self.to_time_embed[0](time.float()).to(self.to_time_embed[1].weight.dtype)
        time_embed = self.to_time_embed[1:](sinusoid)
        if context is not None and self.feature_pooling is not None:
            time_embed = self.feature_pooling(time_embed, context, context_mask, context_lengths)
        return time_embed


def down_block(config: UNetConfig, level: int) -> DownSampleBlock:
    """Down level ``level`` of the U-Net (every level but the deepest halves the resolution); the ControlNet copies
    all but the deepest."""
    hidden_dims = [config.resolved_init_channels] + [config.model_channels * m for m in config.dim_mult]
    return DownSampleBlock(
        hidden_dims[level],
        hidden_dims[level + 1],
        config.resolved_time_embed_dim,
        config.context_dim if config.add_cross_attention[level] else None,
        config.num_blocks[level],
        groups=config.groups,
        head_dim=config.head_dim,
        expansion_ratio=config.expansion_ratio,
        compression_ratio=config.compression_ratio,
        down_sample=level != len(config.dim_mult) - 1,
        self_attention=config.add_self_attention[level],
    )


class UNet(TimeConditioned, nn.Module):
    """Kandinsky 3 U-Net predicting ε.

    ``forward(x, time, context, context_mask, control_residuals)``:
      x (B, num_channels, h, w) latent (plus mask / masked latent channels for inpainting), h and w divisible by
      ``config.downsample_factor``; time (B,) float timesteps; context (B, L, context_dim) projected text tokens;
      context_mask (B, L) with 1 = attend; control_residuals: optional list of tensors added to the skips of down
      levels 0.. (ControlNet, spec §8.4); context_lengths (B,): each sample's own crop length, for batches of
      prompts of different lengths (None: the official mean over all L positions); image_tokens (B, N, context_dim)
      and image_weight (a number or (B,)): the IP-Adapter's image tokens read by every text cross-attention layer
      (an ``IPAdapter`` must be attached; spec §8.2).
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        self.config = config = UNetConfig.with_overrides(config, overrides)
        init_channels = config.resolved_init_channels
        te = config.resolved_time_embed_dim
        self.init_time_layers(config)
        self.in_layer = nn.Conv2d(config.num_channels, init_channels, 3, padding=1)

        hidden_dims = [init_channels] + [config.model_channels * m for m in config.dim_mult]
        in_out = list(zip(hidden_dims[:-1], hidden_dims[1:]))
        text_dims = [config.context_dim if a else None for a in config.add_cross_attention]
        levels = len(in_out)
        common = dict(
            groups=config.groups,
            head_dim=config.head_dim,
            expansion_ratio=config.expansion_ratio,
            compression_ratio=config.compression_ratio,
        )
        self.down_samples = nn.ModuleList(down_block(config, level) for level in range(levels))
        cat_dims = [b for _, b in in_out[:-1]] + [0]  # the skip each down level leaves (the deepest: none)
        self.up_samples = nn.ModuleList()
        for level, ((b, a), n, text_dim, self_attn) in enumerate(
            zip(reversed(in_out), reversed(config.num_blocks), reversed(text_dims), reversed(config.add_self_attention))
        ):
            self.up_samples.append(
                UpSampleBlock(
                    a, cat_dims.pop(), b, te, text_dim, n, up_sample=level != 0, self_attention=self_attn, **common
                )
            )
        self.out_layer = nn.Sequential(
            nn.GroupNorm(config.groups, init_channels),
            nn.SiLU(),
            nn.Conv2d(init_channels, config.out_channels, 3, padding=1),
        )
        self.gradient_checkpointing = False  # recompute each level in the backward pass (training memory)

    @property
    def in_channels(self) -> int:
        return self.in_layer.in_channels

    def forward(
        self,
        x,
        time,
        context=None,
        context_mask=None,
        control_residuals=None,
        context_lengths=None,
        extra_channels=None,
        image_tokens=None,
        image_weight=None,
    ):
        """``extra_channels`` (B, C, h, w) are concatenated after x (inpainting: keep-mask, masked-image latent);
        ``control_residuals`` are added to the skips (ControlNet); ``context_lengths`` (B,) per-sample pooling
        lengths for batches of prompts of different lengths; ``image_tokens`` / ``image_weight`` the IP-Adapter's
        image tokens and their weight (text cross-attention only; pooling and self-attention never see them)."""
        if extra_channels is not None:
            x = torch.cat([x, extra_channels], dim=1)
        time_embed = self.time_embedding(time, context, context_mask, context_lengths)
        ip = () if image_tokens is None else (image_tokens, 1.0 if image_weight is None else image_weight)
        x = self.in_layer(x)
        skips = []
        for level, down in enumerate(self.down_samples):
            x = self._run_level(down, x, time_embed, context, context_mask, *ip)
            if level != len(self.down_samples) - 1:
                skips.append(x)
        if control_residuals is not None:
            skips = [s + r for s, r in zip(skips, control_residuals)]
        for level, up in enumerate(self.up_samples):
            if level != 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._run_level(up, x, time_embed, context, context_mask, *ip)
        return self.out_layer(x)

    def _run_level(self, level, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(level, *args, use_reentrant=False)
        return level(*args)
