"""Training configuration: one YAML file per run, read strictly into typed dataclasses.

The top level is :class:`TrainConfig`; ``model:`` is the recipe's own parameter dataclass (``Recipe.Params``, found
through the recipe table ``recipes.RECIPES``); ``data:`` is :class:`DataConfig`; ``optimizers:`` overrides the
learning rate, betas or weight decay of a recipe's named optimizers. A key that is not a field anywhere — top level,
``model:``, ``model.unet:``, ``data:`` … — is a one-line error naming the key and the nearest valid one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..models.config import ConfigError, build_dataclass, unknown_key

DATA_SOURCES = ("world", "folder", "webdataset")
MAX_WORLD_OBJECTS = 3  # the world's scenes (docs/nano.md), its captions' and judge's range
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class DataConfig:
    source: str = "world"  # world | folder | webdataset
    path: str | None = None  # folder of image + .txt caption pairs, or a shard pattern
    size: int = 64  # training resolution (pixels)
    length: int = 20000  # world: number of distinct scenes
    split: str = "train"
    num_workers: int = 0
    cache: bool = True  # world: render once into memory
    object_counts: tuple[int, ...] | None = None  # world: scene i has object_counts[i % len] objects (None: drawn)
    complete_captions: bool = False  # world: every object's size, colour, position and the background stated
    twins_share: float = 0.0  # world: share of multi-object scenes whose first two objects share shape and size


@dataclass
class OptimizerConfig:
    """Overrides for one of the recipe's named optimizers (``optimizers: {generator: {lr: 1e-4}}``); unset fields
    keep the recipe's values (which default to the top-level ``lr`` and ``weight_decay``)."""

    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None


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
        raise ConfigError(f"config {path} extends itself (cycle through {[str(p) for p in seen]})")
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config is a mapping of keys to values, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent:
        data = _merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), data)
    return data


@dataclass
class TrainConfig:
    recipe: str  # a name in kandinsky3.training.recipes.RECIPES
    output_dir: str = "runs/train"
    model: Any = None  # the recipe's parameter dataclass (Recipe.Params), built from the YAML's `model:` section
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4  # the recipe's optimizers start from this (see `optimizers`)
    weight_decay: float = 0.0
    optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)  # per-optimizer overrides, by name
    warmup_steps: int = 100
    grad_clip: float | None = 1.0  # max gradient norm per optimizer (0 or null: no clipping)
    ema_decay: float | None = 0.999
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # complete checkpoints kept in OUTPUT_DIR/checkpoints (the newest ones)
    sample_every: int = 500
    log_every: int = 50
    seed: int = 0
    export_dir: str | None = None  # the final (EMA) weights as a loadable model folder; default OUTPUT_DIR/export
    time_budget_minutes: float | None = None  # fit `steps` into this wall time (see loop.TimeBudget)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        """Read a YAML config (``extends:`` resolved); keyword overrides that are not None replace top-level keys
        (the CLI's ``--steps``, ``--output-dir`` …). Errors name the file."""
        data = _read_yaml(Path(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        from .recipes import RECIPES

        if not isinstance(data, dict):
            raise ConfigError(f"a training config is a mapping of keys to values, got {data!r}")
        recipe = data.get("recipe")
        if recipe is None:
            raise ConfigError(f"recipe is required (one of {', '.join(sorted(RECIPES))})")
        if recipe not in RECIPES:
            raise unknown_key(recipe, RECIPES, what="recipe")
        params_type = RECIPES[recipe].Params
        top = {f.name for f in fields(cls)}
        for key in data:
            if key not in top and key in {f.name for f in fields(params_type)}:
                raise ConfigError(f"{key!r} is a parameter of the {recipe} recipe: put it under model:")
            if key not in top:
                raise unknown_key(key, top)
        data = dict(data)
        data["model"] = build_dataclass(params_type, data.get("model") or {}, "model")
        cfg = build_dataclass(cls, data)
        cfg.validate()
        return cfg

    def validate(self):
        """Values that would run but do something silently wrong (0 steps export untrained weights …)."""

        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(self.steps >= 1, f"steps must be ≥ 1, got {self.steps} (0 steps would export untrained weights)")
        need(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        need(self.grad_clip is None or self.grad_clip >= 0, f"grad_clip must be ≥ 0 (0: off), got {self.grad_clip}")
        need(
            self.ema_decay is None or 0 <= self.ema_decay < 1,
            f"ema_decay must be in [0, 1) or null, got {self.ema_decay}",
        )
        need(
            self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )
        for name in ("checkpoint_every", "sample_every", "log_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name} must be ≥ 1, got {getattr(self, name)}")
        need(
            self.time_budget_minutes is None or self.time_budget_minutes > 0,
            f"time_budget_minutes must be > 0, got {self.time_budget_minutes}",
        )
        for name, opt in self.optimizers.items():
            need(opt.lr is None or (math.isfinite(opt.lr) and opt.lr > 0), f"optimizers.{name}.lr must be > 0")
            need(opt.betas is None or all(0 <= b < 1 for b in opt.betas), f"optimizers.{name}.betas must be in [0, 1)")
        d = self.data
        need(d.source in DATA_SOURCES, f"data.source must be one of {', '.join(DATA_SOURCES)}, got {d.source!r}")
        need(d.source == "world" or bool(d.path), f"data.source={d.source} needs data.path")
        need(d.size >= 8, f"data.size must be ≥ 8 pixels, got {d.size}")
        need(d.length >= 1, f"data.length must be ≥ 1, got {d.length}")
        need(d.num_workers >= 0, f"data.num_workers must be ≥ 0, got {d.num_workers}")
        counts = d.object_counts
        need(
            counts is None or (len(counts) > 0 and all(1 <= n <= MAX_WORLD_OBJECTS for n in counts)),
            f"data.object_counts must list object counts from 1 to {MAX_WORLD_OBJECTS}, got {counts}",
        )
        need(0.0 <= d.twins_share <= 1.0, f"data.twins_share must be a share from 0 to 1, got {d.twins_share}")
        if counts is not None or d.complete_captions or d.twins_share:
            from .recipes import RECIPES

            need(
                d.source == "world",
                "data.object_counts, data.complete_captions and data.twins_share are options of data.source=world",
            )
            need(
                RECIPES[self.recipe].reads_plain_world_data(),
                f"the {self.recipe} recipe builds its own world samples and reads none of data.object_counts, "
                "data.complete_captions, data.twins_share: remove them",
            )
        check = getattr(self.model, "validate", None)
        if check is not None:
            check(self)

    def with_steps(self, steps: int) -> TrainConfig:
        """A copy planned for ``steps`` (what a time budget fitted); the config itself is never changed."""
        return replace(self, steps=steps)

    def to_dict(self) -> dict:
        return asdict(self)
