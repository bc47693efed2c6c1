"""What every config dataclass shares: strict construction from dicts (YAML/JSON), tuple fields, dict round trips.

``build_dataclass`` is the one reader of config dicts: every key must be a field (a misspelt key is an error that
names it and the nearest valid one, at any depth), nested dataclasses are built the same way, lists become the
tuples a field declares, and a scalar of the wrong kind (``steps: "ten"``) is an error naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message is one line naming the key."""


def unknown_key(key, valid: Iterable[str], where: str = "", owner: str = "", what: str = "key") -> ConfigError:
    """``unknown key 'model.unet.grups'; did you mean 'groups'?`` (or the valid keys when nothing is close);
    ``owner`` names the config class when there is no ``where`` path."""
    valid = sorted(valid)
    name = f"{where}.{key}" if where else str(key)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid {what}s: {', '.join(valid)}"
    return ConfigError(f"unknown {what} {name!r}{f' in {owner}' if owner and not where else ''}; {hint}")


def _label(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(tp, value, where: str):
    """``value`` as the annotated type ``tp`` (nested dataclasses built strictly), or a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{where} may not be empty (null)")
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is typing.Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build_dataclass(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None and args and len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} entries, got {len(value)}")
        kinds = [item] * len(value) if item is not None else (args or [typing.Any] * len(value))
        return tuple(_convert(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(kinds, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, typing.Any)
        return {k: _convert(item, v, _label(where, k)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value) if isinstance(value, int) else value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def build_dataclass(cls, data, where: str = ""):
    """``cls(**data)`` for a dataclass, strictly: unknown keys (with the nearest valid one), missing required
    keys and values of the wrong kind are a one-line ``ConfigError`` naming the key (``where`` prefixes it)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in init_fields:
            raise unknown_key(key, init_fields, where, cls.__name__)
    missing = [
        name
        for name, f in init_fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_label(where, missing[0])} is required")
    kwargs = {key: _convert(hints[key], value, _label(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


class FrozenConfig:
    """Mixin for ``@dataclass(frozen=True)`` configs; ``_tuple_fields`` are coerced to tuples."""

    _tuple_fields: tuple[str, ...] = ()

    def __post_init__(self):
        for name in self._tuple_fields:
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def with_overrides(cls, config=None, overrides: Mapping | None = None):
        """``config`` (default: the defaults) with the fields in ``overrides`` replaced — what a model's
        ``Model(config, **overrides)`` builds from."""
        config = config or cls()
        return dataclasses.replace(config, **overrides) if overrides else config

    @classmethod
    def from_dict(cls, data: Mapping, where: str = ""):
        """Build from a dict (a JSON model config, a YAML section); a key that is not a field is an error naming
        it and the nearest field, so a misspelt option never falls back silently to its default."""
        return build_dataclass(cls, data, where)
