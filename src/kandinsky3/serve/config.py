"""Server configuration: one dataclass; its command-line options are derived from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

API_KEY_ENV = "KANDINSKY3_API_KEY"


def _opt(help: str, **cli) -> dict:
    return {"help": help, "cli": cli}


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata=_opt("address to listen on (0.0.0.0: every interface)"))
    port: int = field(default=8000, metadata=_opt("port"))
    data_dir: str = field(
        default="kandinsky3-serve", metadata=_opt("folder of the job database (SQLite) and the result images")
    )
    models: list[str] = field(
        default_factory=lambda: ["nano"],
        metadata=_opt(
            "models to load, each NAME or NAME=SOURCE (a registered name, hub id or folder); the first that can do "
            "a task is its default",
            nargs="+",
        ),
    )
    upscaler: str | None = field(
        default="nano", metadata=_opt("upscaler for the upscale task (nano, x4, x2, flash-x2, a folder; none: off)")
    )
    devices: list[str] | None = field(
        default=None,
        metadata=_opt(
            "one worker per device, each with its own copy of the models (default: cuda if any, else cpu)", nargs="+"
        ),
    )
    threads: int | None = field(
        default=None, metadata=_opt("torch CPU threads of the process (default: torch's; 1 is best on a busy CPU)")
    )
    dtype: str | None = field(default=None, metadata=_opt("weights dtype", choices=("fp32", "fp16", "bf16")))
    max_queue: int = field(default=64, metadata=_opt("unfinished jobs the queue holds; more are refused with 429"))
    max_batch: int = field(
        default=1,
        metadata=_opt(
            "images per batched sampler run of compatible text→image jobs (default 1: no batching; batched images "
            "match their solo runs up to float rounding, not bit for bit)"
        ),
    )
    retention: int = field(default=1000, metadata=_opt("finished jobs kept (with their images); older ones go"))
    max_side: int = field(default=1024, metadata=_opt("largest width / height of a generated or input image"))
    max_upscale_side: int = field(default=4096, metadata=_opt("largest side of an upscaled image"))
    max_steps: int = field(default=100, metadata=_opt("most denoising steps per request"))
    max_images: int = field(default=8, metadata=_opt("most images per request (prompts × num_images)"))
    max_prompt_length: int = field(default=2000, metadata=_opt("most characters per prompt"))
    max_body_bytes: int = field(default=20 * 2**20, metadata=_opt("largest request body (413 above)"))
    api_key: str | None = field(
        default=None,
        metadata=_opt(f"require this key (Authorization: Bearer KEY or X-API-Key: KEY); default: ${API_KEY_ENV}"),
    )
    cors_origins: list[str] = field(
        default_factory=list, metadata=_opt("origins allowed by CORS (default: none, CORS off)", nargs="*")
    )
    sync_timeout: float = field(default=600.0, metadata=_opt("seconds POST /v1/generate waits for its image"))
    log_level: str = field(default="info", metadata=_opt("uvicorn log level"))

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        for name in (
            "max_queue",
            "max_batch",
            "retention",
            "max_side",
            "max_upscale_side",
            "max_steps",
            "max_images",
            "max_prompt_length",
            "max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def model_sources(self) -> dict[str, str]:
        out = {}
        for spec in self.models:
            name, _, source = spec.partition("=")
            out[name] = source or name
        return out


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per :class:`ServeConfig` field (for ``kandinsky3 serve``)."""
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        cli = dict(f.metadata.get("cli", {}))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = next((t for t in (int, float) if t in (typing.get_args(hints[f.name]) or (hints[f.name],))), str)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default, help=f.metadata["help"], **cli
        )
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    if values["upscaler"] in ("none", ""):
        values["upscaler"] = None
    return ServeConfig(**values)
