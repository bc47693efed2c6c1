"""Training configuration: one YAML file per run, read into typed dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class DataConfig:
    source: str = "world"  # world | folder | webdataset
    path: str | None = None  # folder of image + .txt caption pairs, or a shard pattern
    size: int = 64  # training resolution (pixels)
    length: int = 20000  # world: number of distinct scenes
    split: str = "train"
    num_workers: int = 0
    cache: bool = True  # world: render once into memory


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A YAML config; ``extends: other.yaml`` (relative to this file) starts from that config and overrides
    the keys given here (nested sections merge), so a follow-up stage of a run records only what changed."""
    import yaml

    if path.resolve() in seen:
        raise ValueError(f"config {path} extends itself (cycle through {[str(p) for p in seen]})")
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("extends", None)
    if parent:
        data = _merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), data)
    return data


@dataclass
class TrainConfig:
    recipe: str  # movq | diffusion
    output_dir: str = "runs/train"
    model: dict = field(default_factory=dict)  # recipe-specific model config (see docs/training.md)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    seed: int = 0
    cfg_dropout: float = 0.1  # diffusion: fraction of captions replaced by the null embedding
    export_dir: str | None = None  # where the final (EMA) weights are written as a loadable model folder
    time_budget_minutes: float | None = None  # shorten `steps` to end within this wall time (see loop.TimeBudget)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        data = _read_yaml(Path(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}; valid: {sorted(known)}")
        data = dict(data)
        data["data"] = DataConfig(**data.get("data", {}))
        if data.get("recipe") not in ("movq", "diffusion", "superres"):
            raise ValueError(f"recipe must be movq, diffusion or superres, got {data.get('recipe')!r}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)
