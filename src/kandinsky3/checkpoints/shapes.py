"""Configs read off state-dict shapes, for official ``.pt`` files (which carry no config).

What shapes cannot tell (attention head width, GroupNorm groups, the MoVQ's nominal resolution) comes from the
given base config — the official values for the released models.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..models.movq import MoVQConfig
from ..models.unet import UNetConfig
from .io import CheckpointError


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(sd: dict[str, torch.Tensor], base: UNetConfig) -> UNetConfig:
    try:
        levels = _indices(sd, r"down_samples\.(\d+)\.")
        widths = [
            sd[f"down_samples.{i}.resnet_attn_blocks.0.0.resnet_blocks.3.projection.weight"].shape[0] for i in levels
        ]
        cross = [f"down_samples.{i}.resnet_attn_blocks.0.1.attention.to_key.weight" in sd for i in levels]
        context_dim = next(
            (
                sd[f"down_samples.{i}.resnet_attn_blocks.0.1.attention.to_key.weight"].shape[1]
                for i, c in zip(levels, cross)
                if c
            ),
            None,
        )
        first_attn = next((i for i, c in zip(levels, cross) if c), None)
        expansion = (
            base.expansion_ratio
            if first_attn is None
            else (
                sd[f"down_samples.{first_attn}.resnet_attn_blocks.0.1.feed_forward.0.weight"].shape[0]
                // widths[first_attn]
            )
        )
        hidden = sd["down_samples.0.resnet_attn_blocks.0.0.resnet_blocks.0.projection.weight"].shape[0]
        init = sd["in_layer.weight"].shape[0]
        return replace(
            base,
            model_channels=widths[0],
            init_channels=init,
            num_channels=sd["in_layer.weight"].shape[1],
            out_channels=sd["out_layer.2.weight"].shape[0],
            time_embed_dim=sd["to_time_embed.1.weight"].shape[0],
            context_dim=context_dim,
            expansion_ratio=expansion,
            compression_ratio=max(init, widths[0]) // hidden,
            dim_mult=tuple(w // widths[0] for w in widths),
            num_blocks=tuple(len(_indices(sd, rf"down_samples\.{i}\.resnet_attn_blocks\.(\d+)\.")) for i in levels),
            add_cross_attention=tuple(cross),
            add_self_attention=tuple(
                any(k.startswith(f"down_samples.{i}.self_attention_block.") for k in sd) for i in levels
            ),
        )
    except (KeyError, IndexError, StopIteration, ZeroDivisionError) as exc:
        raise CheckpointError(f"the U-Net state dict does not have the Kandinsky 3 layout (missing {exc})") from exc


def infer_movq_config(sd: dict[str, torch.Tensor], base: MoVQConfig) -> MoVQConfig:
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = _indices(sd, r"encoder\.down\.(\d+)\.")
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        attn_levels = [i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd)]
        return replace(
            base,
            ch=ch,
            ch_mult=mult,
            num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
            attn_resolutions=tuple(base.resolution // 2**i for i in attn_levels),
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_ch=sd["decoder.conv_out.weight"].shape[0],
            z_channels=sd["decoder.conv_in.weight"].shape[1],
            embed_dim=sd["quant_conv.weight"].shape[0],
        )
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"the MoVQ state dict does not have the official layout (missing {exc})") from exc
