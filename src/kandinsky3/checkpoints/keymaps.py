"""State-dict key maps between the official Kandinsky 3 layout and diffusers (spec §12.3, §12.4).

Pure functions on dicts of tensors; no file I/O. Every map is exactly invertible on the official key set, so a
round trip official → diffusers → official is bit-identical.
"""

from __future__ import annotations

import re

import torch

from ..models.movq import MoVQConfig
from ..models.unet import UNetConfig

# ---------------------------------------------------------------------------------------------------------------
# U-Net

_UNET_RENAMES = [  # applied in this order (spec §12.3 step 3)
    ("to_time_embed.1", "time_embedding.linear_1"),
    ("to_time_embed.3", "time_embedding.linear_2"),
    ("in_layer", "conv_in"),
    ("out_layer.0", "conv_norm_out"),
    ("out_layer.2", "conv_out"),
    ("down_samples", "down_blocks"),
    ("up_samples", "up_blocks"),
    ("projection_lin", "encoder_hid_proj.projection_linear"),
    ("projection_ln", "encoder_hid_proj.projection_norm"),
    ("feature_pooling", "add_time_condition"),
    ("to_query.", "to_q."),
    ("to_key.", "to_k."),
    ("to_value.", "to_v."),
    ("output_layer", "to_out.0"),
    ("self_attention_block", "attentions.0"),
]
_PROJECTION_TO_DIFFUSERS = {
    "0.weight": "encoder_hid_proj.projection_linear.weight",
    "1.weight": "encoder_hid_proj.projection_norm.weight",
    "1.bias": "encoder_hid_proj.projection_norm.bias",
}


def unet_key_to_diffusers(key: str) -> str:
    for old, new in _UNET_RENAMES:
        key = key.replace(old, new)

    def triple(m: re.Match) -> str:
        i, slot = int(m.group(1)), m.group(2)
        return {"0": f"resnets_in.{i}.", "1": f"attentions.{i + 1}.", "2": f"resnets_out.{i}."}[slot]

    return re.sub(r"resnet_attn_blocks\.(\d+)\.([012])\.", triple, key)


def unet_key_from_diffusers(key: str) -> str:
    key = re.sub(r"resnets_in\.(\d+)\.", lambda m: f"resnet_attn_blocks.{m.group(1)}.0.", key)
    key = re.sub(r"resnets_out\.(\d+)\.", lambda m: f"resnet_attn_blocks.{m.group(1)}.2.", key)
    key = re.sub(r"attentions\.([1-9]\d*)\.", lambda m: f"resnet_attn_blocks.{int(m.group(1)) - 1}.1.", key)
    for old, new in reversed(_UNET_RENAMES):
        if old in ("projection_lin", "projection_ln"):
            continue  # the projection is split out separately
        key = key.replace(new, old)
    return key


def unet_to_diffusers(unet: dict[str, torch.Tensor], projection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``unet`` dict + its ``projection*.pt`` dict → diffusers ``Kandinsky3UNet`` state dict."""
    out = {unet_key_to_diffusers(k): v for k, v in unet.items()}
    missing = set(_PROJECTION_TO_DIFFUSERS) - set(projection)
    if missing:
        raise KeyError(f"projection state dict lacks {sorted(missing)}")
    out.update({_PROJECTION_TO_DIFFUSERS[k]: projection[k] for k in _PROJECTION_TO_DIFFUSERS})
    return out


def unet_from_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """diffusers ``Kandinsky3UNet`` state dict → (official ``unet`` dict, ``projection.pt`` dict)."""
    inverse = {v: k for k, v in _PROJECTION_TO_DIFFUSERS.items()}
    projection = {inverse[k]: v for k, v in sd.items() if k in inverse}
    unet = {unet_key_from_diffusers(k): v for k, v in sd.items() if k not in inverse}
    return unet, projection


def unet_config_to_diffusers(config: UNetConfig, encoder_hid_dim: int | None = None, strict: bool = True) -> dict:
    """``encoder_hid_dim``: the text encoder's width (the projection's input), by default ``context_dim``.

    ``strict=False`` writes the nearest diffusers config for a U-Net it cannot express (the exact config then
    lives in our side file) instead of raising."""
    channels = [config.model_channels * m for m in config.dim_mult]
    representable = (
        config.resolved_init_channels == channels[0] // 2
        and len(set(config.num_blocks)) == 1
        and config.add_cross_attention == (False,) + (True,) * (len(channels) - 1)
        and config.add_self_attention == (False,) + (True,) * (len(channels) - 1)
        and config.out_channels == config.num_channels
        and config.expansion_ratio == 4
        and config.compression_ratio == 2
    )
    if not representable and strict:
        raise ValueError(
            "diffusers' Kandinsky3UNet cannot express this U-Net config (it hard-codes init_channels = "
            "block_out_channels[0]/2, equal blocks per level, attention pattern (F,T,T,T) and out = in channels; "
            "the 9-channel inpainting U-Net is not representable)"
        )
    return {
        "_class_name": "Kandinsky3UNet",
        "in_channels": config.num_channels,
        "time_embedding_dim": config.resolved_time_embed_dim,
        "groups": config.groups,
        "attention_head_dim": config.head_dim,
        "layers_per_block": config.num_blocks[0],
        "block_out_channels": channels,
        "cross_attention_dim": config.context_dim,
        "encoder_hid_dim": encoder_hid_dim or config.context_dim,
    }


def unet_config_from_diffusers(cfg: dict) -> tuple[UNetConfig, int]:
    """diffusers config → (our config, encoder_hid_dim, the text-encoder width the projection expects)."""
    channels = list(cfg.get("block_out_channels", (384, 768, 1536, 3072)))
    levels = len(channels)
    base = channels[0]
    layers = cfg.get("layers_per_block", 3)
    config = UNetConfig(
        model_channels=base,
        init_channels=base // 2,
        num_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("in_channels", 4),
        time_embed_dim=cfg.get("time_embedding_dim", 1536),
        context_dim=cfg.get("cross_attention_dim", 4096),
        groups=cfg.get("groups", 32),
        head_dim=cfg.get("attention_head_dim", 64),
        dim_mult=tuple(c // base for c in channels),
        num_blocks=tuple(layers if isinstance(layers, int) else layers[i] for i in range(levels)),
        add_cross_attention=(False,) + (True,) * (levels - 1),
        add_self_attention=(False,) + (True,) * (levels - 1),
    )
    return config, cfg.get("encoder_hid_dim", 4096)


# ---------------------------------------------------------------------------------------------------------------
# MoVQ


def _movq_levels(keys) -> int:
    return 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k)))


def movq_key_to_diffusers(key: str, num_levels: int) -> str:
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    rest = re.sub(r"^down\.(\d+)\.block\.", r"down_blocks.\1.resnets.", rest)
    rest = re.sub(r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions.", rest)
    rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
    flip = lambda m: str(num_levels - 1 - int(m.group(1)))  # noqa: E731
    rest = re.sub(r"^up\.(\d+)\.block\.", lambda m: f"up_blocks.{flip(m)}.resnets.", rest)
    rest = re.sub(r"^up\.(\d+)\.attn\.", lambda m: f"up_blocks.{flip(m)}.attentions.", rest)
    rest = re.sub(r"^up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{flip(m)}.upsamplers.0.", rest)
    rest = rest.replace("mid.block_1.", "mid_block.resnets.0.").replace("mid.block_2.", "mid_block.resnets.1.")
    rest = rest.replace("mid.attn_1.", "mid_block.attentions.0.")
    rest = rest.replace("norm_out.", "conv_norm_out.").replace("nin_shortcut", "conv_shortcut")
    if part == "encoder":
        rest = rest.replace(".norm_layer", "")
        rest = re.sub(r"(attentions\.\d+\.)norm\.", r"\1group_norm.", rest)
    else:
        rest = re.sub(r"(attentions\.\d+\.)norm\.", r"\1spatial_norm.", rest)
    rest = re.sub(r"(attentions\.\d+\.)(q|k|v)\.", r"\1to_\2.", rest)
    rest = re.sub(r"(attentions\.\d+\.)proj_out\.", r"\1to_out.0.", rest)
    return f"{part}.{rest}"


def _is_attention_projection(diffusers_key: str) -> bool:
    return bool(re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def movq_to_diffusers(sd: dict[str, torch.Tensor], num_vq_embeddings: int = 16384) -> dict[str, torch.Tensor]:
    """Official ``movq.pt`` → diffusers ``VQModel``; adds an all-zero codebook (decode with force_not_quantize)."""
    levels = _movq_levels(sd)
    out = {}
    for k, v in sd.items():
        nk = movq_key_to_diffusers(k, levels)
        out[nk] = v.reshape(v.shape[:2]) if _is_attention_projection(nk) else v
    embed_dim = sd["quant_conv.weight"].shape[0]
    out["quantize.embedding.weight"] = torch.zeros(num_vq_embeddings, embed_dim, dtype=sd["quant_conv.weight"].dtype)
    return out


def movq_from_diffusers(sd: dict[str, torch.Tensor], config: MoVQConfig) -> dict[str, torch.Tensor]:
    """diffusers ``VQModel`` state dict → official ``movq.pt`` layout (the codebook is dropped)."""
    from ..models.movq import MoVQ

    with torch.device("meta"):
        official_keys = list(MoVQ(config).state_dict())
    levels = len(config.ch_mult)
    inverse = {movq_key_to_diffusers(k, levels): k for k in official_keys}
    unknown = set(sd) - set(inverse) - {"quantize.embedding.weight"}
    if unknown:
        raise KeyError(f"diffusers MoVQ has keys with no official counterpart: {sorted(unknown)[:5]}")
    out = {}
    for dk, ok in inverse.items():
        v = sd[dk]
        out[ok] = v[:, :, None, None] if _is_attention_projection(dk) else v
    return out


def movq_config_to_diffusers(config: MoVQConfig) -> dict:
    res, attn_levels = config.resolution, []
    for i in range(len(config.ch_mult)):
        attn_levels.append(res in config.attn_resolutions)
        res //= 2
    return {
        "_class_name": "VQModel",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn_levels],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn_levels)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "vq_embed_dim": config.embed_dim,
        "num_vq_embeddings": 16384,
        "norm_num_groups": config.num_groups,
        "norm_type": "spatial",
        "sample_size": config.resolution,
        "scaling_factor": 0.18215,
    }


def movq_config_from_diffusers(cfg: dict) -> MoVQConfig:
    channels = list(cfg["block_out_channels"])
    ch = channels[0]
    resolution = cfg.get("sample_size", 256)
    attn = [resolution // 2**i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("Attn")]
    return MoVQConfig(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(attn),
        in_channels=cfg.get("in_channels", 3),
        out_ch=cfg.get("out_channels", 3),
        resolution=resolution,
        z_channels=cfg.get("latent_channels", 4),
        embed_dim=cfg.get("vq_embed_dim") or cfg.get("latent_channels", 4),
        num_groups=cfg.get("norm_num_groups", 32),
    )
