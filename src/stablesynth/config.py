"""Typed configs: pydantic models loaded from YAML/TOML/JSON files.

Every config in the project subclasses :class:`Config` (a pydantic model with
``extra="forbid"``, validated strictly: a string is never read as a number and a
typo'd key is never ignored). Loading turns pydantic's errors into one
:class:`ConfigError` line that names the file and the dotted key, so a mistake in a
YAML file never silently falls back to a default.

Cross-field rules live in a subclass's :meth:`Config.check`, which raises through
:func:`require`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T", bound="Config")

#: A (low, high) pair of numbers; YAML writes it as a two-item list.
FloatPair = Annotated[tuple[StrictFloat, StrictFloat], Field(strict=False)]


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


def require(cond: bool, key: str, message: str) -> None:
    """Raise a :class:`ConfigError` for ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(cls: type[BaseModel], exc: ValidationError, prefix: str) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    key = prefix + _loc(tuple(err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        parent: Any = cls
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(part) if isinstance(part, str) and hasattr(parent, "model_fields") else None
            parent = field.annotation if field is not None else None
        known = ", ".join(sorted(parent.model_fields)) if hasattr(parent, "model_fields") else ""
        return ConfigError(f"unknown key {key} (known keys: {known})")
    msg = str(err["msg"])
    if kind == "value_error":
        # A check() message already names its own key; prefix the parents' path.
        msg = msg.removeprefix("Value error, ")
        if key and msg.startswith("unknown key "):
            return ConfigError(f"unknown key {key}.{msg.removeprefix('unknown key ')}")
        return ConfigError(f"{key}.{msg}" if key else msg)
    return ConfigError(f"{key}: {msg}, got {err.get('input')!r}")


class Config(BaseModel):
    """Base for all configs: strict loading, a cross-field check hook, round trip to plain dicts."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _first_error(type(self), exc, "") from None

    def check(self) -> None:
        """Override to check cross-field constraints; raise :class:`ConfigError` naming the key."""

    @model_validator(mode="after")
    def _run_check(self) -> Config:
        self.check()
        return self

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, _prefix: str = "") -> T:
        """Validate a plain mapping (as parsed from YAML/TOML/JSON)."""
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{_prefix or 'config'}: expected a mapping, got {type(data).__name__}")
        try:
            # JSON mode: lists are accepted for tuples and ints for floats, nothing else is coerced.
            text = json.dumps(data or {}, default=_plain)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{_prefix or 'config'}: {exc}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise _first_error(cls, exc, _prefix) from None

    @classmethod
    def from_file(cls: type[T], path: str | Path) -> T:
        """Load from a ``.yaml``/``.yml``/``.toml``/``.json`` file; errors name the file."""
        path = Path(path)
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def replace(self: T, **changes: Any) -> T:
        merged = self.to_dict()
        merged.update({k: v.to_dict() if isinstance(v, Config) else v for k, v in changes.items()})
        return type(self).from_dict(merged)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Config):
        return obj.to_dict()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} value {obj!r} is not a plain config value")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML/TOML/JSON config file to a mapping; every error is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unsupported config format {path.suffix!r} (use .yaml, .toml, .json)")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data
