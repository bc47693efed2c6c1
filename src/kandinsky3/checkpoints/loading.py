"""From a name, hub id or folder to built modules: resolve files, read them, build U-Net / MoVQ / text encoder."""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.movq import MoVQ
from ..models.seeding import drawing_from
from ..models.text import TextEncoder, build_word_tokenizer, make_projection
from ..models.unet import UNet
from ..registry import ALIASES, DEFAULT_VARIANT, OFFICIAL_REPO, VARIANTS, Variant, get_variant, variant_for
from .io import CheckpointError, cast_floating, check_finite, load_into
from .layouts import WRITERS, RawCheckpoint, read


@dataclass
class Components:
    variant: Variant
    unet: UNet
    movq: MoVQ
    text_encoder: TextEncoder


# ---------------------------------------------------------------------------------------------------------------
# where the files are


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub can be asked at all: not offline mode, and it answers a TCP connect within ``timeout`` (so an
    offline machine fails at once instead of retrying for half a minute)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_command(repo: str, files: list[str]) -> str:
    includes = " ".join(f"--include '{f}'" for f in files)
    return f"hf download {repo} {includes} --local-dir ./{repo.split('/')[-1]}"


def resolve(
    name_or_path: str | os.PathLike | None, local_files_only: bool = False, variant_name: str | None = None
) -> tuple[Path | None, Variant | None]:
    """→ (local folder, or None for the in-memory ``tiny`` preset; the variant if a registered name was given, or
    ``variant_name``).

    Accepts a folder, a registered name (``nano``, ``base``, ``flash``, …), or a Hugging Face repo id.
    ``variant_name`` (``--variant``) picks a U-Net of an official folder; beside a registered name it is checked
    before anything downloads, and with the official repo's id it picks which U-Net's files to fetch.
    """
    text = str(DEFAULT_VARIANT if name_or_path is None else name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, variant_for(None, variant_name)
    if text.lower() in VARIANTS or text.lower() in ALIASES:
        official_repo = text.lower() == OFFICIAL_REPO.lower()  # it holds every official U-Net
        variant = get_variant(variant_name) if official_repo and variant_name else get_variant(text)
        variant = variant_for(variant, variant_name)
        if variant.local_dir is not None:
            if not (variant.local_dir / "kandinsky3.json").is_file():
                raise CheckpointError(
                    f"the {variant.name} weights are not in this installation ({variant.local_dir}): this release "
                    "may not ship them yet (the variant's docs page says how to train it), or the "
                    "install is incomplete (reinstall it; docs/nano.md rebuilds nano); or pass a model folder"
                )
            return variant.local_dir, variant
        if variant.hub_repo is None:
            if variant.name == "tiny":
                return None, variant
            raise CheckpointError(
                f"the {variant.name!r} variant has no published weights ({variant.description}); "
                "train it with `kandinsky3 train` or pass a folder with your own checkpoint"
            )
        return _download(variant.hub_repo, variant.official_files, local_files_only, variant.name), variant
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith(".") and not path.exists():
        return _download(text, None, local_files_only), variant_for(None, variant_name)
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds the model")
    if "/" in text or os.sep in text:
        raise CheckpointError(f"model folder not found: {path}")
    get_variant(text)  # raises the 'unknown model' error with the list of names
    raise AssertionError("unreachable")


def _download(repo: str, files: list[str] | None, local_files_only: bool, variant: str | None = None) -> Path:
    """``variant``: the registered name the files are for; an official repo holds several U-Nets, so the hint
    names it (``--variant flash``) unless it is the folder's default, base."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=files, local_files_only=local_files_only))
    except Exception as exc:  # offline, gated, missing: one clear message
        wanted = files or ["(the whole repository)"]
        raise CheckpointError(
            f"could not get {repo} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            f"Files expected: {', '.join(wanted)}.\n"
            f"Fetch them on a machine with internet access:\n    {fetch_command(repo, files or ['*'])}\n"
            f"then pass that folder as the model (e.g. `--model ./{repo.split('/')[-1]}"
            f"{f' --variant {variant}' if variant not in (None, 'base') else ''}`)."
        ) from exc


# ---------------------------------------------------------------------------------------------------------------
# building


def parse_dtype(value, default=torch.float32):
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if value not in table:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(table)}")
    return table[value]


def build_unet(raw: RawCheckpoint, dtype=None, device="cpu") -> UNet:
    with torch.device("meta"):
        unet = UNet(raw.variant.unet)
    load_into(unet, raw.unet, "U-Net checkpoint")
    return unet.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)


def build_movq(raw: RawCheckpoint, dtype=None, device="cpu") -> MoVQ:
    with torch.device("meta"):
        movq = MoVQ(raw.variant.movq)
    load_into(movq, raw.movq, "MoVQ checkpoint")
    return movq.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)


def build_text_encoder(raw: RawCheckpoint, dtype=None, device="cpu", quantization: str | None = None) -> TextEncoder:
    from transformers import AutoTokenizer, T5EncoderModel

    if raw.text_encoder_dir is None:
        raise CheckpointError("the checkpoint has no text encoder folder (T5 config + weights + tokenizer)")
    if raw.null_embedding is not None:
        check_finite({"null_embedding": raw.null_embedding}, "U-Net checkpoint")
    kwargs = {"dtype": parse_dtype(dtype)}
    if quantization in ("8bit", "4bit"):
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as exc:  # pragma: no cover
            raise CheckpointError("8/4-bit text encoders need `pip install kandinsky3[quantization]`") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit"
        )
        kwargs["device_map"] = {"": device}
    elif quantization:
        raise ValueError(f"quantization must be None, '8bit' or '4bit', not {quantization!r}")
    try:
        encoder = T5EncoderModel.from_pretrained(raw.text_encoder_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(raw.tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the T5 text encoder from {raw.text_encoder_dir}: {exc}") from exc
    if not quantization:
        encoder = encoder.to(device)
    encoder.eval().requires_grad_(False)
    d_model, context_dim = raw.projection["0.weight"].shape[1], raw.projection["0.weight"].shape[0]
    projection = make_projection(d_model, context_dim)
    load_into(projection, raw.projection, "text projection")
    projection = projection.to(
        device=device, dtype=torch.float32 if quantization else parse_dtype(dtype)
    ).requires_grad_(False)
    return TextEncoder(tokenizer, encoder, projection, raw.null_embedding).to(device)


def load_components(
    name_or_path=None,
    *,
    device="cpu",
    unet_dtype=None,
    movq_dtype=None,
    text_encoder_dtype=None,
    text_encoder_device=None,
    quantization=None,
    local_files_only=False,
    variant: str | None = None,
) -> Components:
    root, named = resolve(name_or_path, local_files_only, variant)
    if root is None:  # the random tiny preset: built in fp32, then cast like loaded weights
        tiny = tiny_components(named, device=device)
        for module, dtype in (
            (tiny.unet, unet_dtype),
            (tiny.movq, movq_dtype),
            (tiny.text_encoder, text_encoder_dtype),
        ):
            if dtype is not None:
                module.to(parse_dtype(dtype))
        return tiny
    raw = read(root, named)
    return Components(
        variant=raw.variant,
        unet=build_unet(raw, unet_dtype, device),
        movq=build_movq(raw, movq_dtype, device),
        text_encoder=build_text_encoder(raw, text_encoder_dtype, text_encoder_device or device, quantization),
    )


# ---------------------------------------------------------------------------------------------------------------
# the in-memory random preset, and writing any components back to disk

TINY_WORDS = (
    "a an the of in on at and with red orange yellow green blue purple white black gray circle square "
    "triangle star small large big top bottom left right center background cat dog photo painting"
).split()


def tiny_components(variant: Variant | None = None, seed: int = 0, device="cpu") -> Components:
    """Random weights for every part, deterministic in ``seed``: exercises all code paths in tests."""
    from transformers import T5Config, T5EncoderModel

    variant = variant or VARIANTS["tiny"]
    with drawing_from(torch.Generator().manual_seed(seed)):
        tokenizer = build_word_tokenizer(list(TINY_WORDS))
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_ff=64,
                d_kv=16,
                num_layers=2,
                num_heads=2,
                feed_forward_proj="gated-silu",
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                dropout_rate=0.0,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
        context_dim = variant.unet.context_dim
        projection = make_projection(32, context_dim)
        null = torch.randn(context_dim)
        unet = UNet(variant.unet)
        movq = MoVQ(variant.movq)
        for module in (unet, movq):  # the official zero-init of the modulation would make the tiny net trivial
            for p in module.parameters():
                p.data.normal_(0, 0.05)
    text = TextEncoder(tokenizer, t5.eval(), projection, null)
    return Components(variant, unet.eval().to(device), movq.eval().to(device), text.to(device))


def components_to_raw(components: Components, workdir: Path, dtype: torch.dtype | None = None) -> RawCheckpoint:
    """Official-layout state dicts of built components; the T5 + tokenizer are saved into ``workdir``.
    ``dtype`` casts the floating-point tensors (e.g. fp16 to halve a committed model's size)."""
    te = components.text_encoder
    te_dir = Path(workdir) / "text_encoder"
    encoder = te.encoder if dtype is None else copy.deepcopy(te.encoder).to(dtype)
    encoder.save_pretrained(te_dir, safe_serialization=True)
    te.tokenizer.save_pretrained(te_dir)
    sd = lambda m: {k: cast_floating(v, dtype) for k, v in m.state_dict().items()}  # noqa: E731
    null = None if te.null_embedding is None else cast_floating(te.null_embedding, dtype)
    return RawCheckpoint(components.variant, sd(components.unet), sd(te.projection), sd(components.movq), null, te_dir)


def save_components(
    components: Components, path: str | os.PathLike, layout: str = "native", dtype: torch.dtype | None = None
):
    if layout not in WRITERS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(WRITERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = components_to_raw(components, Path(tmp), dtype)
        WRITERS[layout](raw, path)
