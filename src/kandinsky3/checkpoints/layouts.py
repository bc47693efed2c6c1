"""The three folder layouts a Kandinsky 3 model can come in, read into and written from one ``RawCheckpoint``.

- official (``ai-forever/Kandinsky3.1``): ``weights/kandinsky3*.pt`` ({'unet', 'null_embedding'}),
  ``weights/movq.pt``, ``weights/flan_ul2_encoder/`` (T5 + tokenizer + ``projection*.pt``);
- diffusers (``kandinsky-community/kandinsky-3``): ``model_index.json``, ``unet/``, ``movq/``, ``text_encoder/``,
  ``tokenizer/``; we add ``unet/null_embedding.safetensors`` when we know it and ``kandinsky3_defaults.json``
  (our exact configs and sampler defaults), so nothing is lost. A U-Net that diffusers' ``Kandinsky3UNet`` cannot
  express (nano: cross-attention at every level) is still written with diffusers key names and loads here from
  the side file; diffusers itself cannot run it;
  ``weights/kandinsky3*.config.json`` is our side file beside the U-Net file (configs, sampler defaults, size),
  written by every conversion so a model that is not a released preset (nano, tiny) loads back unchanged;
  official code never opens it;
- native (this project, safetensors): ``kandinsky3.json``, ``unet.safetensors`` (official keys +
  ``null_embedding``), ``projection.safetensors``, ``movq.safetensors``, ``text_encoder/``.

Conversions go through state dicts only, so official → diffusers → official is bit-identical.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..models.movq import MoVQConfig
from ..models.unet import UNetConfig
from ..registry import VARIANTS, SamplerDefaults, Variant
from . import keymaps
from .io import CheckpointError, load_file, load_json, save_json, save_safetensors, save_torch, tensors_only
from .shapes import infer_movq_config, infer_unet_config

NATIVE_CONFIG = "kandinsky3.json"
DIFFUSERS_SIDECAR = "kandinsky3_defaults.json"  # our sampler defaults beside a diffusers folder
TEXT_ENCODER_FILES = ("config.json", "*.safetensors", "*.bin", "*.json", "spiece.model", "*.txt")


@dataclass
class RawCheckpoint:
    """State dicts and configs of one model variant, in the official key layout."""

    variant: Variant
    unet: dict[str, torch.Tensor]
    projection: dict[str, torch.Tensor]
    movq: dict[str, torch.Tensor]
    null_embedding: torch.Tensor | None
    text_encoder_dir: Path | None
    tokenizer_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.text_encoder_dir


def detect_layout(root: Path) -> str:
    if (root / NATIVE_CONFIG).is_file():
        return "native"
    if (root / "model_index.json").is_file() or (root / "unet" / "config.json").is_file():
        return "diffusers"
    if (root / "weights").is_dir() or any(root.glob("kandinsky3*.pt")) or (root / "movq.pt").is_file():
        return "official"
    raise CheckpointError(
        f"{root} holds no Kandinsky 3 model: expected {NATIVE_CONFIG} (native), model_index.json (diffusers) or "
        "weights/kandinsky3*.pt + weights/movq.pt (official ai-forever/Kandinsky3.1 layout)"
    )


def read(root: str | Path, variant: Variant | None = None) -> RawCheckpoint:
    root = Path(root)
    readers = {"native": read_native, "diffusers": read_diffusers, "official": read_official}
    return readers[detect_layout(root)](root, variant)


# ---------------------------------------------------------------------------------------------------------------
# official


def _official_weights_dir(root: Path) -> Path:
    return root / "weights" if (root / "weights").is_dir() else root


def _official_relative(path: str) -> str:
    return path.removeprefix("weights/")


def official_sidecar(unet_file: Path) -> Path:
    """Our config side file beside an official U-Net file: ``kandinsky3.pt`` → ``kandinsky3.config.json``."""
    return unet_file.with_name(unet_file.stem + ".config.json")


def _variant_meta(raw: "RawCheckpoint") -> dict:
    """What a side file records so a model loads back exactly: name, configs, sampler defaults, size."""
    v = raw.variant
    return {
        "format": "kandinsky3-sidecar",
        "name": v.name,
        "variant": _base_name(v),
        "unet": v.unet.to_dict(),
        "movq": v.movq.to_dict(),
        "sampler": v.sampler.to_dict(),
        "size": v.size,
    }


def _apply_meta(variant: Variant, meta: dict) -> Variant:
    changes = {}
    if "unet" in meta:
        changes["unet"] = UNetConfig.from_dict(meta["unet"])
    if "movq" in meta:
        changes["movq"] = MoVQConfig.from_dict(meta["movq"])
    if "sampler" in meta:
        changes["sampler"] = SamplerDefaults(**meta["sampler"])
    named = VARIANTS.get(meta.get("variant", ""))
    if named is not None and named.name != variant.name:
        changes["description"] = named.description
    return replace(variant, name=meta.get("name", variant.name), size=meta.get("size", variant.size), **changes)


def read_official(root: Path, variant: Variant | None = None) -> RawCheckpoint:
    wdir = _official_weights_dir(root)
    variant = variant or _official_variant(wdir)
    if not variant.unet_file:
        raise CheckpointError(f"the {variant.name!r} variant has no official checkpoint files")
    files = {
        name: wdir / _official_relative(getattr(variant, name))
        for name in ("unet_file", "projection_file", "movq_file")
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    te_dir = wdir / _official_relative(variant.text_encoder_dir or "weights/flan_ul2_encoder")
    if missing:
        raise CheckpointError(f"official {variant.name} checkpoint is incomplete; missing: {', '.join(missing)}")
    blob = load_file(files["unet_file"])
    if not isinstance(blob, dict) or "unet" not in blob:
        raise CheckpointError(f"{files['unet_file']} has no 'unet' entry; is it an official kandinsky3*.pt?")
    unet = tensors_only(blob["unet"], str(files["unet_file"]))
    null = blob.get("null_embedding")
    movq = tensors_only(load_file(files["movq_file"]), str(files["movq_file"]))
    sidecar = official_sidecar(files["unet_file"])
    if sidecar.is_file():  # written by our conversions: the exact configs, not inferred ones
        resolved = _apply_meta(variant, load_json(sidecar))
    else:
        configs = dict(unet=infer_unet_config(unet, variant.unet), movq=infer_movq_config(movq, variant.movq))
        if (configs["unet"], configs["movq"]) != (variant.unet, variant.movq):
            configs.update(
                name=f"{variant.name}-custom",
                description=f"{variant.name} file layout with non-release sizes (configs read from the shapes)",
            )
        resolved = replace(variant, **configs)
    return RawCheckpoint(
        variant=resolved,
        unet=unet,
        projection=tensors_only(load_file(files["projection_file"]), str(files["projection_file"])),
        movq=movq,
        null_embedding=None if null is None else null.reshape(-1),
        text_encoder_dir=te_dir if te_dir.is_dir() else None,
    )


def _official_variant(wdir: Path) -> Variant:
    """The variant of an official folder when none is named: base if its U-Net is there, else the only official
    U-Net present (a folder fetched for Flash or inpainting alone), else base (whose missing files are then named)."""
    present = [v for v in VARIANTS.values() if v.unet_file and (wdir / _official_relative(v.unet_file)).is_file()]
    return present[0] if len(present) == 1 else VARIANTS["base"]


def write_official(raw: RawCheckpoint, root: str | Path):
    wdir = Path(root) / "weights"
    v = raw.variant
    unet_file = v.unet_file or "weights/kandinsky3.pt"
    projection_file = v.projection_file or "weights/flan_ul2_encoder/projection.pt"
    save_torch({"unet": raw.unet, "null_embedding": raw.null_embedding}, wdir / _official_relative(unet_file))
    save_json(_variant_meta(raw), official_sidecar(wdir / _official_relative(unet_file)))
    save_torch(raw.projection, wdir / _official_relative(projection_file))
    save_torch(raw.movq, wdir / "movq.pt")
    _copy_text_encoder(raw, wdir / "flan_ul2_encoder", wdir / "flan_ul2_encoder")


# ---------------------------------------------------------------------------------------------------------------
# native


def read_native(root: Path, variant: Variant | None = None) -> RawCheckpoint:
    meta = load_json(root / NATIVE_CONFIG)
    base = VARIANTS.get(meta.get("variant", ""), VARIANTS["base"])
    v = replace(
        base,
        name=meta.get("name", base.name),
        unet=UNetConfig.from_dict(meta["unet"]),
        movq=MoVQConfig.from_dict(meta["movq"]),
        sampler=SamplerDefaults(**meta.get("sampler", {})),
        size=meta.get("size", base.size),
    )
    unet = load_file(root / "unet.safetensors")
    null = unet.pop("null_embedding", None)
    shared = _shared_root(root, meta)
    te = shared / "text_encoder"
    return RawCheckpoint(
        v,
        unet,
        load_file(shared / "projection.safetensors"),
        load_file(shared / "movq.safetensors"),
        null,
        te if te.is_dir() else None,
        extra=meta.get("extra", {}),
    )


def _shared_root(root: Path, meta: dict) -> Path:
    """Where the text encoder, projection and MoVQ of a native folder are: the folder itself, or — for a variant
    that only retrains the U-Net (nano-flash) — the model its ``"shares"`` key names (a registered name or a path
    relative to the folder), so the package holds one copy of them."""
    name = meta.get("shares")
    if not name:
        return root
    named = VARIANTS.get(name)
    shared = named.local_dir if named is not None and named.local_dir else (root / name)
    if not (shared / "movq.safetensors").is_file():
        raise CheckpointError(
            f"{root / NATIVE_CONFIG} shares its text encoder and MoVQ with {name!r}, which has no model folder "
            f"({shared}): install that model, or convert a complete copy"
        )
    return shared


def write_native(raw: RawCheckpoint, root: str | Path):
    root = Path(root)
    v = raw.variant
    unet = dict(raw.unet)
    if raw.null_embedding is not None:
        unet["null_embedding"] = raw.null_embedding
    save_safetensors(unet, root / "unet.safetensors")
    save_safetensors(raw.projection, root / "projection.safetensors")
    save_safetensors(raw.movq, root / "movq.safetensors")
    _copy_text_encoder(raw, root / "text_encoder", root / "text_encoder")
    save_json(
        {
            "format": "kandinsky3-native",
            "name": v.name,
            "variant": _base_name(v),
            "unet": v.unet.to_dict(),
            "movq": v.movq.to_dict(),
            "sampler": v.sampler.to_dict(),
            "size": v.size,
            "extra": raw.extra,
        },
        root / NATIVE_CONFIG,
    )


def _base_name(v: Variant) -> str:
    return v.name if v.name in VARIANTS else "base"


# ---------------------------------------------------------------------------------------------------------------
# diffusers


def _diffusers_weights(folder: Path) -> Path:
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no diffusion_pytorch_model weights in {folder}")


def read_diffusers(root: Path, variant: Variant | None = None) -> RawCheckpoint:
    from ..models.movq import MoVQ
    from ..models.unet import UNet

    unet_cfg, _ = keymaps.unet_config_from_diffusers(load_json(root / "unet" / "config.json"))
    extra_file = root / DIFFUSERS_SIDECAR
    meta = load_json(extra_file) if extra_file.is_file() else {}  # our exact configs, written by write_diffusers
    if "unet" in meta:
        unet_cfg = UNetConfig.from_dict(meta["unet"])
    unet, projection = keymaps.unet_from_diffusers(load_file(_diffusers_weights(root / "unet")))
    movq_cfg = keymaps.movq_config_from_diffusers(load_json(root / "movq" / "config.json"))
    if "movq" in meta:
        movq_cfg = MoVQConfig.from_dict(meta["movq"])
    movq = keymaps.movq_from_diffusers(load_file(_diffusers_weights(root / "movq")), movq_cfg)
    null_file = root / "unet" / "null_embedding.safetensors"
    null = load_file(null_file)["null_embedding"] if null_file.is_file() else None
    base = variant or VARIANTS["base"]
    v = replace(base, unet=unet_cfg, movq=movq_cfg)
    if meta:
        v = _apply_meta(v, {**meta, "unet": unet_cfg.to_dict(), "movq": movq_cfg.to_dict()})
    te, tok = root / "text_encoder", root / "tokenizer"
    with torch.device("meta"):
        unet, movq = _module_order(unet, UNet(unet_cfg)), _module_order(movq, MoVQ(movq_cfg))
    return RawCheckpoint(v, unet, projection, movq, null, te if te.is_dir() else None, tok if tok.is_dir() else None)


def _module_order(sd: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Re-key ``sd`` in the module's own order (diffusers files are sorted), so written .pt files match."""
    order = list(module.state_dict())
    return {k: sd[k] for k in order if k in sd} | {k: v for k, v in sd.items() if k not in set(order)}


def write_diffusers(raw: RawCheckpoint, root: str | Path):
    root = Path(root)
    v = raw.variant
    save_json(
        keymaps.unet_config_to_diffusers(v.unet, raw.projection["0.weight"].shape[1], strict=False),
        root / "unet" / "config.json",
    )
    save_safetensors(
        keymaps.unet_to_diffusers(raw.unet, raw.projection), root / "unet" / "diffusion_pytorch_model.safetensors"
    )
    if raw.null_embedding is not None:
        save_safetensors({"null_embedding": raw.null_embedding}, root / "unet" / "null_embedding.safetensors")
    save_json(keymaps.movq_config_to_diffusers(v.movq), root / "movq" / "config.json")
    save_safetensors(keymaps.movq_to_diffusers(raw.movq), root / "movq" / "diffusion_pytorch_model.safetensors")
    save_json(
        {
            "_class_name": "DDPMScheduler",
            "beta_schedule": "squaredcos_cap_v2",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "clip_sample": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "variance_type": "fixed_small",
            "thresholding": False,
        },
        root / "scheduler" / "scheduler_config.json",
    )
    save_json(
        {
            "_class_name": "Kandinsky3Pipeline",
            "movq": ["diffusers", "VQModel"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "unet": ["diffusers", "Kandinsky3UNet"],
        },
        root / "model_index.json",
    )
    save_json(_variant_meta(raw), root / DIFFUSERS_SIDECAR)
    _copy_text_encoder(raw, root / "text_encoder", root / "tokenizer")


# ---------------------------------------------------------------------------------------------------------------


def _copy_text_encoder(raw: RawCheckpoint, encoder_dst: Path, tokenizer_dst: Path):
    for src, dst in ((raw.text_encoder_dir, encoder_dst), (raw.tokenizer_dir, tokenizer_dst)):
        if src is None or Path(src).resolve() == Path(dst).resolve():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for f in Path(src).iterdir():
            if f.is_file() and not f.name.startswith("projection"):
                shutil.copy2(f, dst / f.name)


WRITERS = {"official": write_official, "diffusers": write_diffusers, "native": write_native}


def convert(src: str | Path, dst: str | Path, to: str, variant: Variant | None = None) -> RawCheckpoint:
    """Read any layout from ``src`` and write layout ``to`` into ``dst`` (official | diffusers | native)."""
    if to not in WRITERS:
        raise ValueError(f"unknown target layout {to!r}; choose one of {sorted(WRITERS)}")
    raw = read(src, variant)
    WRITERS[to](raw, dst)
    return raw
