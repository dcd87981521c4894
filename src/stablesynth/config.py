"""Typed configs: dataclasses loaded from YAML/TOML dicts with validation.

Every config in the project is a dataclass that inherits :class:`Config`. Loading
rejects unknown keys and wrong types with a :class:`ConfigError` that names the
dotted key, so a typo in a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml

T = TypeVar("T", bound="Config")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return tp.from_dict(value, _prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


@dataclasses.dataclass
class Config:
    """Base for all configs: strict loading, validation hook, round trip to plain dicts."""

    def validate(self) -> None:
        """Override to check cross-field constraints; raise :class:`ConfigError` naming the key."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, _prefix: str = "") -> Self:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {_prefix}{unknown[0]!s} (known keys: {known})")
        kwargs = {name: _check_type(value, hints[name], _prefix + name) for name, value in data.items()}
        obj = cls(**kwargs)
        try:
            obj.validate()
        except ConfigError as exc:
            if _prefix and not str(exc).startswith(_prefix):
                raise ConfigError(f"{_prefix}{exc}") from None
            raise
        return obj

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Load from a ``.yaml``/``.yml``/``.toml``/``.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text) or {}
            elif path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"{path}: unsupported config format {path.suffix!r} (use .yaml, .toml, .json)")
        except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot parse: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> Self:
        merged = self.to_dict()
        merged.update(changes)
        return type(self).from_dict(merged)


def require(cond: bool, key: str, message: str) -> None:
    """Raise a :class:`ConfigError` for ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}: {message}")
