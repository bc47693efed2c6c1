"""IP-Adapter files: our native adapter folder, the released fork layout, the CLIP image encoder.

- **native** (this project): ``ip_adapter.json`` (format, name, adapter config incl. the U-Net it belongs to, how it
  reads an empty prompt, which image encoder), ``ip_adapter.safetensors`` (the released key names: ``image_proj.*``,
  ``image_norm.*``, ``<layer>.processor.to_{key_ip,v_ip,out_ip}.*``), optionally ``image_encoder/``; a folder
  converted from the fork also keeps that file's U-Net (``unet.safetensors``, ``projection.safetensors``, official
  keys) so a conversion back is lossless.
- **fork** (``ai-forever/kandinsky3_ip_adapter``, spec §8.2, §12.3): one U-Net file holding the official U-Net keys,
  ``projection_lin`` / ``projection_ln`` and the adapter keys (``unet/diffusion_pytorch_model.safetensors`` or
  ``.bin``, or one weights file at the root), and ``image_encoder/`` (a ``CLIPVisionModelWithProjection``). Its
  keys are split: adapter → the adapter, ``projection_*`` → the text projection, the rest → the U-Net.

Conversions go through state dicts only: fork → native → fork is bit-identical (test).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..diffusion.image_prompt import check_image_prompt
from ..models.clip import ImageEncoder
from ..models.ip_adapter import IPAdapter, IPAdapterConfig
from ..models.unet import UNetConfig
from ..registry import VARIANTS, get_variant
from .io import CheckpointError, load_file, load_into, load_json, save_json, save_safetensors
from .shapes import infer_unet_config

NATIVE_FILE = "ip_adapter.safetensors"
NATIVE_CONFIG = "ip_adapter.json"
IMAGE_ENCODER_DIR = "image_encoder"
FORK_UNET_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
)
FORK_PROJECTION = {
    "projection_lin.weight": "0.weight",
    "projection_ln.weight": "1.weight",
    "projection_ln.bias": "1.bias",
}
ADAPTER_DIRS = {  # registered adapters and image encoders shipped with the package
    "nano-ip-adapter": Path(__file__).parents[1] / "weights" / "nano-ip-adapter",
    "nano-clip": Path(__file__).parents[1] / "weights" / "nano-clip",
}
RELEASED_REPO = "ai-forever/kandinsky3_ip_adapter"


def is_adapter_key(key: str) -> bool:
    return key.startswith(("image_proj.", "image_norm.")) or ".processor." in key


@dataclass
class RawIPAdapter:
    """An IP-Adapter's tensors (released key names) and what is needed to use it; ``unet`` / ``projection``: the
    fork file's own U-Net (official keys), when the source had one."""

    config: IPAdapterConfig
    adapter: dict[str, torch.Tensor]
    name: str = "ip-adapter"
    text: str = "zeros"  # how an empty prompt / the unconditional branch's text is given: zeros (released) | null
    image_encoder: str | None = None  # a folder, a registered name or a hub id
    unet: dict[str, torch.Tensor] | None = None
    projection: dict[str, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # the adapter's own sampler settings (SAMPLING_KEYS); none: released


#: the sampler settings an adapter may record in ``ip_adapter.json`` ``sampling`` (the defaults of the requests'
#: ``early_boost`` / ``early_fraction``, ``diffusion.image_prompt``), with the values that mean "as released"
SAMPLING_KEYS = {"early_boost": 1.0, "early_fraction": 0.0}


def check_sampling(sampling, where) -> dict:
    """An adapter's ``sampling`` settings, validated (a hand-edited config gets a clear error): none, or both keys."""
    keys = ", ".join(SAMPLING_KEYS)
    if not isinstance(sampling, dict) or (sampling and set(sampling) != set(SAMPLING_KEYS)):
        raise CheckpointError(f"{where}: sampling must be empty or a mapping with both of {keys}, got {sampling!r}")
    try:
        check_image_prompt(**sampling)  # the requests' own rules for these fields
    except ValueError as exc:
        raise CheckpointError(f"{where}: sampling.{exc}") from None
    return dict(sampling)


# ---------------------------------------------------------------------------------------------------------------
# where


def detect_ip_layout(root: Path) -> str:
    if (root / NATIVE_CONFIG).is_file():
        return "native"
    if _fork_unet_file(root) is not None:
        return "fork"
    raise CheckpointError(
        f"{root} holds no IP-Adapter: expected {NATIVE_CONFIG} + {NATIVE_FILE} (native) or the released layout "
        f"({FORK_UNET_FILES[0]} with image_proj / *.processor.to_key_ip keys, and {IMAGE_ENCODER_DIR}/)"
    )


def is_ip_adapter_folder(root: str | Path) -> bool:
    """Whether ``root`` holds an IP-Adapter (native, or the released U-Net file with adapter keys) rather than a
    plain model; a safetensors file is recognised from its header alone."""
    root = Path(root)
    if (root / NATIVE_CONFIG).is_file():
        return True
    file = _fork_unet_file(root) if root.is_dir() else None
    if file is None:
        return False
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:
                return "image_proj.weight" in f.keys()
        except Exception:
            return False
    return (root / IMAGE_ENCODER_DIR).is_dir()


def _fork_unet_file(root: Path) -> Path | None:
    for name in FORK_UNET_FILES:
        if (root / name).is_file():
            return root / name
    candidates = sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    return candidates[0] if len(candidates) == 1 else None


def resolve_folder(name_or_path, local_files_only: bool = False, what: str = "IP-Adapter") -> Path:
    """A registered name (``nano-ip-adapter``, ``nano-clip``), a folder, or a Hugging Face repo id → a folder."""
    text = str(name_or_path)
    if text in ADAPTER_DIRS:
        folder = ADAPTER_DIRS[text]
        if not folder.is_dir():
            raise CheckpointError(
                f"the {text} weights are not in this installation ({folder}); they are package data: reinstall "
                f"the package (pip install -e . from a full clone), or pass a folder you trained (docs/ip_adapter.md: "
                f"kandinsky3 train clip / ip_adapter; --ip-adapter / --image-encoder FOLDER on the command line)"
            )
        return folder
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds the {what}")
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith("."):
        from .loading import _download

        return _download(text, None, local_files_only)
    raise CheckpointError(f"{what} not found: {text!r} is not a folder, a registered name or a hub id")


# ---------------------------------------------------------------------------------------------------------------
# reading and writing


def read_ip_adapter(root: str | Path) -> RawIPAdapter:
    root = Path(root)
    return (read_native_ip if detect_ip_layout(root) == "native" else read_fork_ip)(root)


def read_native_ip(root: Path) -> RawIPAdapter:
    meta = load_json(root / NATIVE_CONFIG)
    if meta.get("format") != "kandinsky3-ip-adapter":
        raise CheckpointError(f"{root / NATIVE_CONFIG} is not an IP-Adapter config (format {meta.get('format')!r})")
    encoder = meta.get("image_encoder")
    if encoder and (root / encoder).is_dir():
        encoder = str(root / encoder)
    unet = load_file(root / "unet.safetensors") if (root / "unet.safetensors").is_file() else None
    projection = load_file(root / "projection.safetensors") if (root / "projection.safetensors").is_file() else None
    return RawIPAdapter(
        IPAdapterConfig.from_dict(meta["config"]),
        load_file(root / NATIVE_FILE),
        meta.get("name", root.name),
        meta.get("text", "zeros"),
        encoder,
        unet,
        projection,
        meta.get("extra", {}),
        check_sampling(meta.get("sampling", {}), root / NATIVE_CONFIG),
    )


def read_fork_ip(root: Path) -> RawIPAdapter:
    file = _fork_unet_file(root)
    blob = load_file(file)
    if "image_proj.weight" not in blob:
        raise CheckpointError(f"{file} has no image_proj.weight: not an IP-Adapter U-Net file")
    adapter = {k: v for k, v in blob.items() if is_adapter_key(k)}
    projection = {FORK_PROJECTION[k]: v for k, v in blob.items() if k in FORK_PROJECTION}
    unet = {k: v for k, v in blob.items() if not is_adapter_key(k) and k not in FORK_PROJECTION}
    context = adapter["image_norm.weight"].shape[0]
    unet_config = infer_unet_config(unet, VARIANTS["base"].unet) if unet else VARIANTS["base"].unet
    config = IPAdapterConfig(
        image_embed_dim=adapter["image_proj.weight"].shape[1],
        num_tokens=adapter["image_proj.weight"].shape[0] // context,
        unet=unet_config,
    )
    encoder = root / IMAGE_ENCODER_DIR
    return RawIPAdapter(
        config,
        adapter,
        root.name,
        "zeros",
        str(encoder) if encoder.is_dir() else None,
        unet or None,
        projection or None,
    )


def write_native_ip(raw: RawIPAdapter, root: str | Path, copy_image_encoder: bool = True):
    root = Path(root)
    save_safetensors(raw.adapter, root / NATIVE_FILE)
    encoder = raw.image_encoder
    if (
        copy_image_encoder
        and encoder
        and Path(encoder).is_dir()
        and Path(encoder).resolve() != (root / IMAGE_ENCODER_DIR).resolve()
    ):
        shutil.copytree(encoder, root / IMAGE_ENCODER_DIR, dirs_exist_ok=True)
        encoder = IMAGE_ENCODER_DIR
    elif encoder and Path(encoder).resolve() == (root / IMAGE_ENCODER_DIR).resolve():
        encoder = IMAGE_ENCODER_DIR
    if raw.unet is not None:
        save_safetensors(raw.unet, root / "unet.safetensors")
    if raw.projection is not None:
        save_safetensors(raw.projection, root / "projection.safetensors")
    save_json(
        {
            "format": "kandinsky3-ip-adapter",
            "name": raw.name,
            "config": raw.config.to_dict(),
            "text": raw.text,
            "image_encoder": encoder,
            "extra": raw.extra,
            **({"sampling": raw.sampling} if raw.sampling else {}),
        },
        root / NATIVE_CONFIG,
    )


def write_fork_ip(raw: RawIPAdapter, root: str | Path):
    """The released single-file layout: ``unet/diffusion_pytorch_model.safetensors`` = U-Net + projection + adapter."""
    if raw.unet is None:
        raise CheckpointError(
            "the released IP-Adapter layout stores the U-Net with the adapter; this adapter folder has no U-Net "
            "(convert from a released folder, or keep the native layout)"
        )
    root = Path(root)
    inverse = {v: k for k, v in FORK_PROJECTION.items()}
    tensors = dict(raw.unet)
    tensors.update({inverse[k]: v for k, v in (raw.projection or {}).items()})
    tensors.update(raw.adapter)
    save_safetensors(tensors, root / FORK_UNET_FILES[0])
    save_json({"_class_name": "UNetKandi3IpAdapter", **raw.config.unet.to_dict()}, root / "unet" / "config.json")
    if raw.image_encoder and Path(raw.image_encoder).is_dir():
        shutil.copytree(raw.image_encoder, root / IMAGE_ENCODER_DIR, dirs_exist_ok=True)


IP_WRITERS = {"native": write_native_ip, "fork": write_fork_ip}


def convert_ip_adapter(src, dst, to: str = "native") -> RawIPAdapter:
    if to not in IP_WRITERS:
        raise ValueError(f"unknown IP-Adapter layout {to!r}; choose one of {sorted(IP_WRITERS)}")
    raw = read_ip_adapter(src)
    if to == "fork" and raw.sampling:
        warnings.warn(
            f"the released layout has no place for the adapter's own sampling settings ({raw.sampling}); "
            "give them with early_boost / early_fraction when you use the converted folder",
            stacklevel=2,
        )
    IP_WRITERS[to](raw, dst)
    return raw


# ---------------------------------------------------------------------------------------------------------------
# building


def build_ip_adapter(raw: RawIPAdapter, unet_config: UNetConfig | None = None, device="cpu", dtype=None) -> IPAdapter:
    """The adapter module, checked against the U-Net it will be attached to (``unet_config``)."""
    from .loading import parse_dtype

    if unet_config is not None:
        _check_unet(raw, unet_config)
    with torch.device("meta"):
        adapter = IPAdapter(raw.config)
    load_into(adapter, raw.adapter, f"IP-Adapter {raw.name}")
    return adapter.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)


def _check_unet(raw: RawIPAdapter, unet: UNetConfig):
    mine = raw.config.unet
    keys = (
        "model_channels",
        "init_channels",
        "context_dim",
        "head_dim",
        "dim_mult",
        "num_blocks",
        "add_cross_attention",
    )
    if any(getattr(mine, k) != getattr(unet, k) for k in keys):
        differ = ", ".join(
            f"{k} {getattr(mine, k)} vs {getattr(unet, k)}" for k in keys if getattr(mine, k) != getattr(unet, k)
        )
        raise CheckpointError(
            f"the IP-Adapter {raw.name!r} was made for another U-Net size ({differ}; adapter vs model). Use the "
            "adapter trained for this model: nano-ip-adapter for nano, ai-forever/kandinsky3_ip_adapter for base"
        )


def load_image_encoder(name_or_path, device="cpu", dtype=None, local_files_only: bool = False) -> ImageEncoder:
    """``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` from a folder (a ``CLIPModel`` folder loads its
    vision tower), a registered name (``nano-clip``) or a hub id (offline: a clear error with the fetch command)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    from ..models.clip import image_processor_class
    from .loading import parse_dtype

    folder = resolve_folder(name_or_path, local_files_only, what="image encoder")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel folder's text tower is "unexpected" for the vision model
    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=parse_dtype(dtype))
        size = vision.config.image_size
        if (folder / "preprocessor_config.json").is_file():
            processor = image_processor_class().from_pretrained(folder)
        else:  # the released image_encoder folder has none: OpenAI CLIP's at the encoder's size
            processor = image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a CLIP image encoder from {folder}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return ImageEncoder(vision.to(device).eval().requires_grad_(False), processor)


@dataclass
class IPAdapterParts:
    """What the IP-Adapter tasks need: the adapter (attached to the pipeline's U-Net), the image encoder and how
    the adapter reads an empty prompt (``text``: zeros | null)."""

    adapter: IPAdapter
    encoder: ImageEncoder
    text: str
    name: str
    sampling: dict = field(default_factory=dict)

    def setting(self, key: str, value=None) -> float:
        """A request's value for a sampling setting, else the adapter's own, else the released behaviour."""
        return float(value if value is not None else self.sampling.get(key, SAMPLING_KEYS[key]))


def load_ip_adapter(
    name_or_path=None,
    unet_config: UNetConfig | None = None,
    *,
    variant=None,
    image_encoder=None,
    device="cpu",
    dtype=None,
    local_files_only: bool = False,
) -> IPAdapterParts:
    """An adapter and its image encoder. ``name_or_path``: a registered name (``nano-ip-adapter``), a folder
    (native or released layout) or a hub id; None: the variant's own (``Variant.ip_adapter``)."""
    if name_or_path is None:
        v = variant if variant is not None else VARIANTS["nano"]
        if isinstance(v, str):
            v = get_variant(v)
        name_or_path = v.ip_adapter
        if name_or_path is None:
            raise CheckpointError(
                f"the {v.name} model has no IP-Adapter; load one with load_ip_adapter(FOLDER) (CLI: --ip-adapter "
                "FOLDER; docs/ip_adapter.md)"
            )
    folder = resolve_folder(name_or_path, local_files_only)
    raw = read_ip_adapter(folder)
    adapter = build_ip_adapter(raw, unet_config, device, dtype)
    encoder_name = image_encoder or raw.image_encoder
    if encoder_name is None:
        raise CheckpointError(f"{folder} names no image encoder; pass image_encoder=FOLDER (a CLIP vision model)")
    encoder = load_image_encoder(encoder_name, device, dtype, local_files_only)
    if encoder.embed_dim != raw.config.image_embed_dim:
        raise CheckpointError(
            f"the image encoder gives {encoder.embed_dim}-d embeddings, the IP-Adapter expects "
            f"{raw.config.image_embed_dim}-d: use the encoder it was trained with"
        )
    return IPAdapterParts(adapter, encoder, raw.text, raw.name, raw.sampling)


def save_ip_adapter(
    adapter: IPAdapter,
    path: str | os.PathLike,
    *,
    name: str,
    text: str,
    image_encoder: str,
    dtype=None,
    sampling: dict | None = None,
):
    """Write a trained adapter in the native layout (``dtype``: e.g. fp16 for a committed one; ``sampling``: its
    own sampler settings, :data:`SAMPLING_KEYS`)."""
    from .io import cast_floating

    sd = {k: cast_floating(v.detach().cpu(), dtype) for k, v in adapter.state_dict().items()}
    raw = RawIPAdapter(adapter.config, sd, name, text, image_encoder, sampling=check_sampling(sampling or {}, path))
    write_native_ip(raw, path, copy_image_encoder=False)
