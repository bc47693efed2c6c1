"""ControlNet files: the released diffusers-fork folder (``ai-forever/kandinsky3_controlnet_hed``) and our native one.

- released (fork ``UNetKandi3Controlnet`` saved by diffusers' ``save_pretrained``): ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` (or ``.bin``), at the folder's root or in its ``controlnet/`` subfolder
  (a pipeline repo). The fork keeps the official key names (spec §12.3: ``input_hint_block.conv1..7/out``,
  ``to_time_embed``, ``feature_pooling``, ``in_layer``, ``down_samples.0..2``, ``convs.0..2``), so the key map is the
  identity; the config's fork fields (``model_dim``, ``time_cond_proj_dim``) are dropped and ``out_channels`` is
  the latent's ``num_channels``;
- native: ``controlnet.json`` (our :class:`ControlNetConfig` + the base model it was trained for) and
  ``controlnet.safetensors``.

Conversion goes through the state dict only (dtypes kept), so released → native → released is bit-identical.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.seeding import drawing_from
from ..models.unet import UNetConfig
from ..registry import CONTROLNETS, VARIANTS
from .io import CheckpointError, cast_floating, load_file, load_into, load_json, save_json, save_safetensors
from .loading import _download, parse_dtype

NATIVE_CONTROLNET_CONFIG = "controlnet.json"
NATIVE_CONTROLNET_WEIGHTS = "controlnet.safetensors"
RELEASED_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_FORK_ONLY = ("model_dim", "time_cond_proj_dim", "hint_channels", "_class_name", "_diffusers_version")


# ---------------------------------------------------------------------------------------------------------------
# released (fork) layout


def _released_dir(root: Path) -> Path | None:
    for folder in (root / "controlnet", root):
        if (folder / "config.json").is_file() and any((folder / w).is_file() for w in RELEASED_WEIGHTS):
            return folder
    return None


def config_from_fork(cfg: dict) -> ControlNetConfig:
    """Our config from the fork's ``config.json`` (``UNetKandi3Controlnet`` constructor arguments)."""
    names = {f.name for f in fields(UNetConfig)}
    unknown = sorted(k for k in cfg if k not in names and k not in _FORK_ONLY and not k.startswith("_"))
    if unknown:
        raise CheckpointError(f"unexpected ControlNet config keys {unknown}: is this a Kandinsky 3 HED ControlNet?")
    unet = {k: v for k, v in cfg.items() if k in names}
    unet["out_channels"] = unet.get("num_channels", 4)
    return ControlNetConfig(UNetConfig.from_dict(unet, "config.json"), int(cfg.get("hint_channels", 3)))


def config_to_fork(config: ControlNetConfig) -> dict:
    """The fork's ``config.json`` for ``config`` (model_dim: the T5 width the fork's U-Net projects from)."""
    u = config.unet.to_dict()
    u.pop("out_channels")
    return {
        "_class_name": "UNetKandi3Controlnet",
        **u,
        "model_dim": 4096,
        "time_cond_proj_dim": None,
        "hint_channels": config.hint_channels,
    }


def read_released(root: Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    folder = _released_dir(root)
    if folder is None:
        raise CheckpointError(f"no released ControlNet in {root}")
    weights = next(folder / w for w in RELEASED_WEIGHTS if (folder / w).is_file())
    return config_from_fork(load_json(folder / "config.json")), load_file(weights)


def write_released(config: ControlNetConfig, state_dict: dict[str, torch.Tensor], root: str | Path):
    folder = Path(root) / "controlnet"
    save_json(config_to_fork(config), folder / "config.json")
    save_safetensors(state_dict, folder / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# native layout


def read_native(root: Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor], dict]:
    meta = load_json(root / NATIVE_CONTROLNET_CONFIG)
    config = ControlNetConfig.from_dict({k: meta[k] for k in ("unet", "hint_channels") if k in meta}, "controlnet")
    return config, load_file(root / NATIVE_CONTROLNET_WEIGHTS), meta


def write_native(
    config: ControlNetConfig, state_dict: dict[str, torch.Tensor], root: str | Path, name: str = "custom", **extra
):
    """``extra``: what else the metadata records (``base``: the model it was trained beside; ``hint``: what the
    hint is, e.g. soft edges)."""
    root = Path(root)
    save_safetensors(state_dict, root / NATIVE_CONTROLNET_WEIGHTS)
    save_json(
        {"format": "kandinsky3-controlnet", "name": name, **config.to_dict(), **extra}, root / NATIVE_CONTROLNET_CONFIG
    )


def save_controlnet(net: ControlNet, path, name: str = "custom", dtype: torch.dtype | None = None, **extra):
    sd = {k: cast_floating(v, dtype) for k, v in net.state_dict().items()}
    write_native(net.config, sd, path, name, **extra)


# ---------------------------------------------------------------------------------------------------------------


def is_controlnet_folder(root: str | Path) -> bool:
    root = Path(root)
    return (root / NATIVE_CONTROLNET_CONFIG).is_file() or _released_dir(root) is not None


def read_controlnet(root: str | Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict, metadata) of a native or released ControlNet folder."""
    root = Path(root)
    if (root / NATIVE_CONTROLNET_CONFIG).is_file():
        return read_native(root)
    if _released_dir(root) is not None:
        config, sd = read_released(root)
        return config, sd, {"name": root.name, "hint_method": "hed"}  # the released one was trained on HED maps
    raise CheckpointError(
        f"{root} holds no ControlNet: expected {NATIVE_CONTROLNET_CONFIG} + {NATIVE_CONTROLNET_WEIGHTS} (native) or "
        "[controlnet/]config.json + diffusion_pytorch_model.safetensors (the released ai-forever layout)"
    )


def convert_controlnet(src: str | Path, dst: str | Path, to: str):
    """``kandinsky3 convert`` for a ControlNet folder: ``native`` or ``diffusers`` (the released fork layout)."""
    config, sd, meta = read_controlnet(src)
    if to == "native":
        extra = {k: v for k, v in meta.items() if k not in ("format", "name", "unet", "hint_channels")}
        write_native(config, sd, dst, meta.get("name", Path(src).name), **extra)
    elif to == "diffusers":
        write_released(config, sd, dst)
    else:
        raise ValueError(
            "the HED ControlNet was released only in the diffusers-fork layout: convert it --to diffusers or "
            "--to native"
        )
    return config


def tiny_controlnet(unet_config: UNetConfig, seed: int = 0) -> ControlNet:
    """Random weights (zero layers included, so it does something), deterministic in ``seed``: for tests."""
    generator = torch.Generator().manual_seed(seed)
    with drawing_from(generator):
        net = ControlNet(ControlNetConfig(unet_config))
    for p in net.parameters():
        p.data.normal_(0, 0.05, generator=generator)
    return net.eval()


def resolve_controlnet(name_or_path: str | Path, local_files_only: bool = False) -> Path | None:
    """A folder for a registered name (:data:`~kandinsky3.registry.CONTROLNETS`), a folder or a hub id; None for
    the random ``tiny`` preset."""
    text = str(name_or_path)
    if text in CONTROLNETS:
        where = CONTROLNETS[text]
        if where is None:
            return None
        if isinstance(where, Path):
            if not (where / NATIVE_CONTROLNET_CONFIG).is_file():
                raise CheckpointError(
                    f"the {text} ControlNet is not in this installation ({where}): this release ships no trained "
                    f"{text} yet; train one (docs/controlnet.md: kandinsky3 train controlnet) and pass its folder "
                    "as controlnet=FOLDER (--controlnet FOLDER on the command line)"
                )
            return where
        text = where
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith("."):
        return _download(text, ["controlnet/*", "config.json", "diffusion_pytorch_model*"], local_files_only)
    raise CheckpointError(f"ControlNet {text!r} not found: give a folder, a hub id or one of {', '.join(CONTROLNETS)}")


def load_controlnet(
    name_or_path: str | Path, unet_config: UNetConfig | None = None, device="cpu", dtype=None, local_files_only=False
) -> ControlNet:
    """Build a ControlNet from a name, folder or hub id; with ``unet_config`` it must belong to that U-Net."""
    root = resolve_controlnet(name_or_path, local_files_only)
    if root is None:
        net = tiny_controlnet(unet_config or VARIANTS["tiny"].unet)
    else:
        config, sd, meta = read_controlnet(root)
        with torch.device("meta"):
            net = ControlNet(config)
        load_into(net, sd, f"ControlNet checkpoint in {root}")
        net.hint_method = meta.get("hint_method", "hed" if meta.get("format") is None else "soft")
    if unet_config is not None:
        net.check_compatible(unet_config)
    return net.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)


__all__ = [
    "convert_controlnet",
    "is_controlnet_folder",
    "load_controlnet",
    "read_controlnet",
    "resolve_controlnet",
    "save_controlnet",
    "tiny_controlnet",
]
