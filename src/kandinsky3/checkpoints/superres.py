"""KandiSuperRes files: the official ``KandiSuperRes*.ckpt`` / ``*_flash_x2.pt`` and our safetensors folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..models.seeding import drawing_from
from ..models.superres import SuperResUNet, SuperResUNetConfig
from ..registry import SUPERRES_REPO, SUPERRES_VARIANTS, VARIANTS
from .io import (
    CheckpointError,
    cast_floating,
    load_file,
    load_into,
    load_json,
    save_json,
    save_safetensors,
    tensors_only,
)
from .loading import _download, parse_dtype

NATIVE_SR_CONFIG = "superres.json"
TINY_SR = SuperResUNetConfig(
    init_channels=32, model_channels=32, time_embed_dim=64, groups=8, num_resnet_blocks=(1, 1, 2, 2)
)


def official_state_dict(path: Path) -> dict[str, torch.Tensor]:
    blob = load_file(path)
    return tensors_only(blob["unet"] if isinstance(blob, dict) and "unet" in blob else blob, str(path))


def infer_config(sd: dict[str, torch.Tensor], base: SuperResUNetConfig = SuperResUNetConfig()) -> SuperResUNetConfig:
    import re

    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down_samples\.(\d+)\.", k))})
    blocks = [
        len({int(m.group(1)) for k in sd if (m := re.match(rf"down_samples\.{i}\.resnet_attn_blocks\.(\d+)\.", k))})
        for i in levels
    ]
    widths = [sd[f"down_samples.{i}.resnet_attn_blocks.0.0.out_block.projection.weight"].shape[0] for i in levels]
    return replace(
        base,
        init_channels=sd["init_conv.weight"].shape[0],
        model_channels=widths[0],
        num_channels=sd["out_conv.weight"].shape[0],
        time_embed_dim=sd["to_time_embed.1.weight"].shape[0],
        dim_mult=tuple(w // widths[0] for w in widths),
        num_resnet_blocks=tuple(blocks),
    )


def build_sr_unet(config: SuperResUNetConfig, sd, device, dtype) -> SuperResUNet:
    with torch.device("meta"):
        unet = SuperResUNet(config)
    load_into(unet, sd, "super-resolution U-Net checkpoint")
    return unet.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)


def save_superres(unet: SuperResUNet, path, scale: int, name: str = "custom", dtype: torch.dtype | None = None):
    path = Path(path)
    save_safetensors({k: cast_floating(v, dtype) for k, v in unet.state_dict().items()}, path / "unet_sr.safetensors")
    save_json(
        {"name": name, "scale": scale, "mode": "standard", "unet": unet.config.to_dict()}, path / NATIVE_SR_CONFIG
    )


def _refine_parts(root: Path, device, dtype, local_files_only):
    """Flash refine: MoVQ + K3 Flash U-Net (official Kandinsky3.1 files) and the empty-prompt context."""
    from ..models.superres import RefineParts, refine_context_from_text_encoder
    from .layouts import read_official
    from .loading import build_movq, build_text_encoder, build_unet

    k3 = root / "Kandinsky3.1" if (root / "Kandinsky3.1").is_dir() else None
    if k3 is None:
        k3 = _download(
            VARIANTS["flash"].hub_repo,
            [VARIANTS["flash"].unet_file, "weights/movq.pt", VARIANTS["flash"].projection_file],
            local_files_only,
        )
    raw = read_official(k3, VARIANTS["flash"])
    context_file, mask_file = root / "weights" / "context.pt", root / "weights" / "context_mask.pt"
    if context_file.is_file() and mask_file.is_file():
        context, mask = load_file(context_file), load_file(mask_file)
    elif raw.text_encoder_dir is not None:
        context, mask = refine_context_from_text_encoder(build_text_encoder(raw, dtype, device))
    else:
        raise CheckpointError(
            "the Flash refine needs weights/context.pt + weights/context_mask.pt (KandiSuperRes) "
            "or the FLAN-UL2 encoder folder to compute the empty-prompt context"
        )
    return RefineParts(build_unet(raw, dtype, device), build_movq(raw, None, device), context.float(), mask)


def _official_upscaler(cls, path: Path, v, device, dtype, local_files_only):
    """An upscaler from a folder holding the official file of variant ``v`` (and, for Flash, the refine parts)."""
    sd = official_state_dict(path / v.file)
    refine = _refine_parts(path, device, dtype, local_files_only) if v.mode == "flash" else None
    unet = build_sr_unet(infer_config(sd), sd, device, dtype)
    return cls(unet, scale=v.scale, mode=v.mode, refine=refine, device=device, name=v.name)


def load_superres(cls, name_or_path, device, dtype=None, local_files_only=False):
    text = "nano" if name_or_path is None else str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_dir():
        if text not in SUPERRES_VARIANTS:
            raise ValueError(f"unknown upscaler {text!r}: use one of {', '.join(SUPERRES_VARIANTS)} or a folder")
        v = SUPERRES_VARIANTS[text]
        if v.name == "tiny":
            generator = torch.Generator().manual_seed(0)  # the caller's global RNG is left alone
            with drawing_from(generator):
                unet = SuperResUNet(TINY_SR)
            for p in unet.parameters():
                p.data.normal_(0, 0.05, generator=generator)
            return cls(unet.eval().to(device), scale=v.scale, device=device, name="tiny", window=64, stride=48)
        if v.local_dir is not None:
            if not (v.local_dir / NATIVE_SR_CONFIG).is_file():
                raise CheckpointError(f"the {v.name} upscaler weights are not in this installation ({v.local_dir})")
            path = v.local_dir
        else:
            path = _download(
                SUPERRES_REPO, [v.file] + (["weights/context*.pt"] if v.mode == "flash" else []), local_files_only
            )
            return _official_upscaler(cls, path, v, device, dtype, local_files_only)
    if (path / NATIVE_SR_CONFIG).is_file():
        meta = load_json(path / NATIVE_SR_CONFIG)
        unet = build_sr_unet(
            SuperResUNetConfig.from_dict(meta["unet"]), load_file(path / "unet_sr.safetensors"), device, dtype
        )
        window = meta.get("window", 1024)
        return cls(
            unet,
            scale=meta["scale"],
            mode=meta.get("mode", "standard"),
            device=device,
            name=meta.get("name", "custom"),
            window=window,
            stride=meta.get("stride", window * 25 // 32),
        )
    for v in SUPERRES_VARIANTS.values():
        if v.file and (path / v.file).is_file():
            return _official_upscaler(cls, path, v, device, dtype, local_files_only)
    raise CheckpointError(
        f"{path} holds no upscaler: expected {NATIVE_SR_CONFIG} or one of "
        f"{', '.join(v.file for v in SUPERRES_VARIANTS.values() if v.file)}"
    )
