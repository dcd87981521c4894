"""Checkpoints: a directory with ``model.safetensors`` and ``manifest.json``.

The manifest records the format version, the kind of checkpoint, when and with which
package versions it was written, every tensor's shape and dtype and the SHA-256 of the
weights file, plus the caller's fields (method name, config, num_classes …). Loading
verifies all of it and refuses anything that does not match with :class:`CheckpointError`:
the manifest is validated field by field (:class:`Manifest`, :class:`MethodManifest`), the
weights file must be a plain name inside the checkpoint folder and every floating tensor
must be finite. Errors are one line naming the checkpoint and the field.

Method checkpoints (``kind="method"``) carry a ``model_version`` that identifies what is
served: :func:`model_version` hashes the weights' SHA-256 with the method name, its config
and ``num_classes``. :func:`save_checkpoint` computes it (a caller's value is overwritten)
and :func:`read_method_manifest` recomputes it, so two checkpoints share a version only if
they serve the same function.

Writes are atomic: the new checkpoint is written and fsynced in a temporary directory
beside the target, then renamed into place; an existing checkpoint is replaced only
after the new one is complete. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from stablesynth.files import sha256_file

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
#: Fields the writer computes; a caller's values for them are overwritten.
RESERVED_FIELDS = ("format_version", "kind", "created", "packages", "weights_file", "sha256", "tensors")
METHOD_KIND = "method"
#: Model ids and versions travel in URLs, HTTP headers and file names: ASCII letters, digits, ``._-``.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of an unknown version or of the wrong kind."""


def check_safe_name(value: str, what: str = "name") -> str:
    """``value`` if it is a safe model id or version (see :data:`SAFE_NAME`), else ValueError."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-128 ASCII letters, digits, '.', '_' or '-' "
                         "(starting with a letter or digit)")
    return value


SafeName = Annotated[StrictStr, Field(pattern="^" + SAFE_NAME.pattern + "$")]


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    dtype: StrictStr


class Manifest(BaseModel):
    """The fields every checkpoint manifest must have, with their types (others are kept)."""

    model_config = ConfigDict(extra="allow")
    format_version: StrictInt
    kind: StrictStr
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    tensors: dict[str, TensorSpec]
    weights_file: StrictStr = WEIGHTS_FILE

    @field_validator("weights_file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # Confined to the checkpoint folder: a plain file name, no separators, no '..'.
        if not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v or Path(v).is_absolute():
            raise ValueError(f"must be a file name inside the checkpoint folder, got {v!r}")
        return v


class MethodManifest(Manifest):
    """A servable method checkpoint: how to rebuild the method, and what to call it."""

    method: SafeName
    num_classes: Annotated[StrictInt, Field(ge=1, le=1_000_000)]
    config: dict[str, Any] = Field(default_factory=dict)
    model_id: SafeName | None = None
    model_version: SafeName | None = None


def _validation_message(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "manifest"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"field {field!r}: {first['msg']}{more}"


def model_version(weights_sha256: str, method: str, config: Mapping[str, Any], num_classes: int) -> str:
    """The version of a served method: 12 hex digits of a hash of its weights and config."""
    key = json.dumps({"weights": weights_sha256, "method": method, "config": dict(config),
                      "num_classes": int(num_classes)}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _package_versions() -> dict[str, str]:
    from stablesynth import __version__

    versions = {"stablesynth": __version__, "torch": torch.__version__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["safetensors"] = importlib.metadata.version("safetensors")
    return versions


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, CPU, unshared copies: what safetensors can write."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_sparse:
            raise ValueError(f"tensor {name!r} is sparse; save its dense form")
        # clone() also breaks storage sharing (tied weights, views), which safetensors refuses.
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def save_checkpoint(directory: str | Path, tensors: Mapping[str, torch.Tensor],
                    manifest: Mapping[str, Any] | None = None, *, kind: str | None = None) -> Path:
    """Write ``tensors`` and ``manifest`` to ``directory`` atomically; returns the directory.

    ``kind`` (or ``manifest["kind"]``, default ``"tensors"``) is checked by
    :func:`load_checkpoint`'s ``expect_kind``. Caller fields must be JSON-serialisable.
    For ``kind="method"`` the manifest must hold ``method``, ``num_classes`` and ``config``
    (and may hold a safe ``model_id``); ``model_version`` is computed (:func:`model_version`).
    """
    target = Path(directory)
    fields = dict(manifest or {})
    kind = kind or fields.get("kind") or "tensors"
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot write checkpoint {target}: a file of that name exists")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        # Never replace a directory that holds something other than a checkpoint.
        raise CheckpointError(f"cannot write checkpoint {target}: the directory exists and is not "
                              "a checkpoint")
    data = _prepare(tensors)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights = tmp / WEIGHTS_FILE
        save_file(data, str(weights), metadata={"format": "pt"})
        _fsync_path(weights)
        for key in RESERVED_FIELDS:
            fields.pop(key, None)
        digest = sha256_file(weights)
        if kind == METHOD_KIND:
            fields["model_version"] = model_version(digest, str(fields.get("method")),
                                                    fields.get("config") or {}, int(fields["num_classes"]))
        full = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "packages": _package_versions(),
            "weights_file": WEIGHTS_FILE,
            "sha256": digest,
            "tensors": {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                        for name, t in data.items()},
            **fields,
        }
        text = json.dumps(full, indent=2, sort_keys=False, allow_nan=False)
        with (tmp / MANIFEST_FILE).open("w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    old: Path | None = None
    if target.exists():
        # Directories cannot be replaced in one rename; move the old one aside first and
        # put it back if the second rename fails.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest of a checkpoint (format version checked, weights not verified)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {MANIFEST_FILE} does not parse "
                              f"({exc})") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {MANIFEST_FILE} is nested too "
                              "deeply") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {directory} is corrupt: {MANIFEST_FILE} is not a JSON object")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"checkpoint {directory} has format_version {version!r}; this stablesynth "
                              f"reads {sorted(SUPPORTED_VERSIONS)}")
    for key in ("kind", "sha256", "tensors"):
        if key not in manifest:
            raise CheckpointError(f"checkpoint {directory} is corrupt: manifest lacks {key!r}")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise CheckpointError(f"checkpoint {directory} is corrupt: manifest "
                              f"{_validation_message(exc)}") from None
    return manifest


def read_method_manifest(directory: str | Path) -> MethodManifest:
    """The validated manifest of a method checkpoint, ``model_version`` recomputed from its content."""
    directory = Path(directory)
    raw = read_manifest(directory)
    for key in ("method", "num_classes"):
        if key not in raw:
            raise CheckpointError(f"checkpoint {directory} is not a method checkpoint: no {key!r}")
    try:
        manifest = MethodManifest.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"checkpoint {directory}: manifest {_validation_message(exc)}") from None
    manifest.model_version = model_version(manifest.sha256, manifest.method, manifest.config,
                                           manifest.num_classes)
    return manifest


def load_checkpoint(directory: str | Path,
                    expect_kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verified ``(tensors, manifest)`` of the checkpoint in ``directory``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if expect_kind is not None and manifest["kind"] != expect_kind:
        raise CheckpointError(f"checkpoint {directory} is a {manifest['kind']!r} checkpoint, "
                              f"expected {expect_kind!r}")
    weights = directory / manifest.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {weights.name} is missing")
    if weights.is_symlink() or weights.resolve().parent != directory.resolve():
        raise CheckpointError(f"checkpoint {directory}: {weights.name} lies outside the checkpoint folder")
    if sha256_file(weights) != manifest["sha256"]:
        raise CheckpointError(f"checkpoint {directory} is corrupt: sha256 mismatch of {weights.name}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory} is corrupt: {weights.name} does not load "
                              f"({exc})") from None
    declared = manifest["tensors"]
    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise CheckpointError(f"checkpoint {directory} is corrupt: tensors differ from the manifest "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for name, t in tensors.items():
        spec = declared[name]
        if not isinstance(spec, dict) or list(t.shape) != spec.get("shape") \
                or _dtype_name(t.dtype) != spec.get("dtype"):
            raise CheckpointError(f"checkpoint {directory} is corrupt: tensor {name!r} is "
                                  f"{list(t.shape)} {_dtype_name(t.dtype)}, the manifest says {spec}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint {directory}: tensor {name!r} holds NaN or Inf")
    return tensors, manifest


def save_module(directory: str | Path, module: nn.Module, manifest: Mapping[str, Any] | None = None, *,
                kind: str | None = None) -> Path:
    """Save ``module.state_dict()`` (parameters and persistent buffers) as a checkpoint."""
    fields = {"module_class": type(module).__name__, **dict(manifest or {})}
    kind = kind or fields.get("kind") or "module"
    return save_checkpoint(directory, module.state_dict(), fields, kind=kind)


def load_module_state(directory: str | Path, module: nn.Module,
                      expect_kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint into ``module`` after a strict name and shape check; returns the manifest."""
    tensors, manifest = load_checkpoint(directory, expect_kind=expect_kind)
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory} does not fit {type(module).__name__}: "
                              f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}, "
                              f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    for name, value in own.items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise CheckpointError(f"checkpoint {directory} does not fit {type(module).__name__}: "
                                  f"key {name!r} has shape {list(tensors[name].shape)}, "
                                  f"the module expects {list(value.shape)}")
        if tensors[name].dtype != value.dtype:  # load_state_dict would cast it silently
            raise CheckpointError(f"checkpoint {directory} does not fit {type(module).__name__}: "
                                  f"key {name!r} is {_dtype_name(tensors[name].dtype)}, "
                                  f"the module holds {_dtype_name(value.dtype)}")
    module.load_state_dict(tensors, strict=True)
    return manifest
