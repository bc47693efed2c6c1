"""What every frozen model config shares: tuple fields (YAML/JSON give lists), dict round trips."""

from __future__ import annotations

from dataclasses import asdict


class FrozenConfig:
    """Mixin for ``@dataclass(frozen=True)`` configs; ``_tuple_fields`` are coerced to tuples."""

    _tuple_fields: tuple[str, ...] = ()

    def __post_init__(self):
        for name in self._tuple_fields:
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a dict, ignoring keys that are not fields (e.g. other codebases' extras)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
