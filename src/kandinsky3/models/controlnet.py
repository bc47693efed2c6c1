"""The released Kandinsky 3.1 HED ControlNet (spec §8.4: the fork's ``UNetKandi3Controlnet``), official key names.

A trainable copy of the U-Net's encoder half: its own time embedding, feature pooling and input layer, copies of
every down level but the last (the released 4-level U-Net → levels 0..2), a hint encoder that brings an
image-resolution hint down ×8 to the latent and adds it after the input layer, and one zero-initialised 1×1 conv
per copied level. ``forward`` returns one residual per skip; the main U-Net adds residual i to skip i before its
up path concatenates it (``UNet.forward(..., control_residuals=...)``: ``cat[x, skip + residual]``), so nothing
enters the deepest level and the U-Net's own encoder is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FrozenConfig
from .unet import TimeConditioned, UNet, UNetConfig, down_block

#: the hint encoder's channel plan as released: (out channels, stride) of conv1..conv7, then ``out`` → init channels
HINT_CONVS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


@dataclass(frozen=True)
class ControlNetConfig(FrozenConfig):
    """The U-Net config the ControlNet belongs to (its encoder is copied from that U-Net) and the hint's channels.

    ``unet.num_channels`` is the latent's channel count (the ControlNet's ``in_layer`` sees x_t only, never
    inpainting's extra channels)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig.from_dict(self.unet, "unet"))
        if len(self.unet.dim_mult) < 2:
            raise ValueError("a ControlNet needs a U-Net with at least 2 levels (it feeds every skip connection)")
        if self.hint_channels < 1:
            raise ValueError(f"hint_channels must be ≥ 1, got {self.hint_channels}")

    @property
    def hint_downsample(self) -> int:
        """How much smaller the latent is than the hint (8: the hint is given at image resolution)."""
        return 2 ** sum(stride == 2 for _, stride in HINT_CONVS)

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "hint_channels": self.hint_channels}


class HintEncoder(nn.Module):
    """``input_hint_block``: seven 3×3 convs with SiLU (three of stride 2), then the zero-initialised ``out`` conv
    to the U-Net's init channels."""

    def __init__(self, hint_channels: int, out_channels: int):
        super().__init__()
        channels = hint_channels
        for i, (width, stride) in enumerate(HINT_CONVS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(channels, width, 3, stride=stride, padding=1))
            channels = width
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.activation = nn.SiLU()

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        x = hint
        for i in range(1, len(HINT_CONVS) + 1):
            x = self.activation(getattr(self, f"conv{i}")(x))
        return self.out(x)


class ControlNet(TimeConditioned, nn.Module):
    """``forward(x, time, hint, context, context_mask, context_lengths) → [residual per skip]``.

    x (B, C, h, w) the noisy latent; hint (B, hint_channels, 8h, 8w) the control image (the nano ControlNet was
    trained on soft edges in [0, 1], three equal channels); the text inputs as for :class:`~.unet.UNet`. Residual i
    has the shape of the U-Net's skip i (the output of down level i)."""

    def __init__(self, config: ControlNetConfig | None = None, **overrides):
        super().__init__()
        self.config = config = ControlNetConfig.with_overrides(config, overrides)
        u = config.unet
        init_channels = u.resolved_init_channels
        self.input_hint_block = HintEncoder(config.hint_channels, init_channels)
        self.init_time_layers(u)
        self.in_layer = nn.Conv2d(u.num_channels, init_channels, 3, padding=1)
        hidden_dims = [init_channels] + [u.model_channels * m for m in u.dim_mult]
        levels = len(u.dim_mult) - 1  # every down level but the deepest: one per skip connection
        self.down_samples = nn.ModuleList(down_block(u, i) for i in range(levels))
        self.convs = nn.ModuleList(nn.Conv2d(hidden_dims[i + 1], hidden_dims[i + 1], 1) for i in range(levels))
        self.zero_output_convs()
        self.hint_method = "soft"  # the edge extractor its hints come from (the loader sets it from the file)

    def zero_output_convs(self):
        """The ControlNet's two zero layers (the residual 1×1 convs and the hint encoder's ``out``): a fresh
        ControlNet adds exactly nothing to the U-Net."""
        for conv in [*self.convs, self.input_hint_block.out]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3) -> "ControlNet":
        """A ControlNet initialised from ``unet``'s encoder (time embedding, pooling, input layer, down levels
        copied), with its zero layers zero and a fresh hint encoder (the released recipe's start)."""
        u = unet.config
        if u.num_channels != unet.in_layer.in_channels:  # pragma: no cover - a config always matches its module
            raise ValueError("the U-Net's in_layer does not match its config")
        net = cls(ControlNetConfig(u, hint_channels))
        net.to(device=unet.in_layer.weight.device, dtype=unet.in_layer.weight.dtype)
        copied = {k: v for k, v in unet.state_dict().items() if k in net.state_dict()}
        missing = [k for k in net.state_dict() if k not in copied and not k.startswith(("input_hint_block.", "convs."))]
        if missing:  # pragma: no cover - the names are the U-Net's by construction
            raise RuntimeError(f"cannot copy the encoder: the U-Net has no {missing[:3]}")
        net.load_state_dict(copied, strict=False)
        return net

    def check_compatible(self, unet_config: UNetConfig):
        """Raise a clear error when this ControlNet was not made for a U-Net of ``unet_config``."""
        mine = self.config.unet
        keys = ("model_channels", "init_channels", "dim_mult", "context_dim", "time_embed_dim", "num_blocks")
        diff = [k for k in keys if getattr(mine, k) != getattr(unet_config, k)]
        if diff:
            details = ", ".join(f"{k} {getattr(mine, k)} vs {getattr(unet_config, k)}" for k in diff)
            raise ValueError(
                f"this ControlNet belongs to another U-Net size ({details}); load the ControlNet made for this model"
            )

    def forward(self, x, time, hint, context=None, context_mask=None, context_lengths=None) -> list[torch.Tensor]:
        factor = self.config.hint_downsample
        if hint.shape[-2:] != (x.shape[-2] * factor, x.shape[-1] * factor):
            raise ValueError(
                f"the hint is {tuple(hint.shape[-2:])}; it must be {factor}× the latent {tuple(x.shape[-2:])} "
                "(the image's size)"
            )
        time_embed = self.time_embedding(time, context, context_mask, context_lengths)
        h = self.in_layer(x) + self.input_hint_block(hint.to(x.dtype))
        residuals = []
        for down, conv in zip(self.down_samples, self.convs):
            h = down(h, time_embed, context, context_mask)
            residuals.append(conv(h))
        return residuals


__all__ = ["ControlNet", "ControlNetConfig", "HintEncoder", "HINT_CONVS"]
