"""Opening a source checkpoint: the model's tensors, its configuration and what else the file carries.

A ``.safetensors`` file is read directly (it holds tensors only). A pickled ``.ckpt``, ``.pth``,
``.pt`` or ``.bin`` goes through :mod:`~stablesynth.models.weights.unpickle`, which refuses any
code before it runs. A Hugging Face folder (``config.json`` beside ``model.safetensors``,
``pytorch_model.bin`` or their sharded ``*.index.json``) is read with its config.

Checkpoints nest the state dict: DeiT's releases as ``{"model": ...}``, PyTorch Lightning's as
``{"state_dict": ..., "hyper_parameters": ..., "optimizer_states": ...}``. One wrapper is
unwrapped; a file with two (a ``model`` and a ``state_dict`` that both hold tensors) is refused,
since which of them is the model cannot be known. A ``module.`` prefix on every key (what
``DataParallel`` saves) is removed. Everything beside the state dict is described, never used,
except Lightning's ``hyper_parameters``, kept as plain data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stablesynth.models.weights.errors import WeightLoadError
from stablesynth.models.weights.unpickle import PlainNamespace, load_pickled_checkpoint, to_plain

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
#: The keys under which checkpoints nest the model's state dict.
WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
#: A Hugging Face folder's weights, in the order they are looked for.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
DATA_PARALLEL_PREFIX = "module."


@dataclasses.dataclass
class SourceCheckpoint:
    """What :func:`read_checkpoint` found in a file or folder."""

    path: Path
    #: "safetensors", "torch zip", "torch legacy" (each with " in a Hugging Face folder" when it is one).
    container: str
    #: The model's state dict, wrapper and ``module.`` prefix removed.
    tensors: dict[str, torch.Tensor]
    #: The key the state dict was nested under ("" when the file is the state dict).
    wrapper: str = ""
    stripped_prefix: str = ""
    #: A Hugging Face folder's ``config.json``.
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: PyTorch Lightning's ``hyper_parameters``, as plain data.
    hyper_parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: A safetensors file's header metadata.
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Every other top-level entry of a pickled checkpoint → what it is (they are not used).
    extras: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The files the tensors came from.
    files: list[Path] = dataclasses.field(default_factory=list)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises its own error types and OSError; all mean "unreadable"
        raise WeightLoadError(f"{path}: cannot read weights: not a complete safetensors file ({exc})") from None


def _count_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, Mapping):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _describe(obj: Any) -> str:
    n = _count_tensors(obj)
    tensors = f", {n} tensors" if n else ""
    if isinstance(obj, Mapping):
        return f"a dict of {len(obj)} entries{tensors}"
    if isinstance(obj, (list, tuple)):
        return f"a list of {len(obj)}{tensors}"
    if isinstance(obj, torch.Tensor):
        return f"a tensor {list(obj.shape)}"
    if isinstance(obj, PlainNamespace):
        return f"an argparse.Namespace of {len(vars(obj))} fields"
    text = repr(obj)
    return f"{type(obj).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _holds_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str, dict[str, str], dict[str, Any]]:
    """``(state dict, wrapper key, the other entries described, Lightning hyper-parameters)`` of ``obj``."""
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{source}: not a state dict: the file holds {_describe(obj)}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}, "", {}, {}
    holders = [w for w in WRAPPERS if _holds_tensors(obj.get(w))]
    if len(holders) > 1:
        raise WeightLoadError(f"{source}: both {holders[0]!r} and {holders[1]!r} hold a state dict; which one is "
                              "the model is ambiguous (save the one you mean on its own)")
    if not holders:
        keys = ", ".join(repr(str(k)) for k in list(obj)[:6])
        raise WeightLoadError(f"{source}: no state dict in it (top-level keys {keys or 'none'}; expected tensors, "
                              f"or one of {', '.join(map(repr, WRAPPERS))} holding them)")
    wrapper = holders[0]
    inner = obj[wrapper]
    for key, value in inner.items():
        if not isinstance(value, torch.Tensor):
            raise WeightLoadError(f"{source}: {wrapper}[{str(key)!r}] is {_describe(value)}, not a tensor")
    extras = {str(k): _describe(v) for k, v in obj.items() if k != wrapper}
    hparams = obj.get("hyper_parameters")
    plain = to_plain(hparams) if isinstance(hparams, Mapping) else {}
    return {str(k): v for k, v in inner.items()}, wrapper, extras, plain


def _read_pickled(path: Path) -> SourceCheckpoint:
    obj = load_pickled_checkpoint(path)
    tensors, wrapper, extras, hparams = unwrap_state_dict(obj, str(path))
    with path.open("rb") as f:
        container = "torch zip" if f.read(4) == b"PK\x03\x04" else "torch legacy"
    return SourceCheckpoint(path, container, tensors, wrapper=wrapper, extras=extras, hyper_parameters=hparams,
                            files=[path])


def _read_file(path: Path) -> SourceCheckpoint:
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        return SourceCheckpoint(path, "safetensors", tensors, metadata=metadata, files=[path])
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickled(path)
    raise WeightLoadError(f"{path}: unsupported weight format {path.suffix!r} (use .safetensors, or "
                          f"{'/'.join(PICKLE_SUFFIXES)}, or a Hugging Face model folder)")


def _read_index(index: Path) -> SourceCheckpoint:
    """A sharded Hugging Face checkpoint: every shard its ``weight_map`` names, merged."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightLoadError(f"{index}: not a shard index ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    files = []
    for name in shards:
        shard = index.parent / name
        if Path(name).name != name or not shard.is_file():
            raise WeightLoadError(f"{index}: shard {name!r} is missing")
        part = _read_file(shard)
        for key in part.tensors:
            if key in tensors:
                raise WeightLoadError(f"{index}: key {key!r} is in more than one shard")
        tensors.update(part.tensors)
        files.append(shard)
    kind = "safetensors" if index.name.startswith("model.safetensors") else "pickled"
    return SourceCheckpoint(index, f"{kind} shards", tensors, files=files)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"{path}: not a readable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise WeightLoadError(f"{path}: not a JSON object")
    return config


def read_checkpoint(path: str | Path) -> SourceCheckpoint:
    """Read a checkpoint file or Hugging Face folder without running anything in it."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in HF_WEIGHT_FILES if (path / n).is_file()), None)
        if found is None:
            raise WeightLoadError(f"{path}: a folder without weights (looked for {', '.join(HF_WEIGHT_FILES)})")
        ckpt = _read_index(found) if found.name.endswith(".index.json") else _read_file(found)
        ckpt.container += " in a Hugging Face folder"
        ckpt.path = path
        ckpt.config = _read_config(path)
    elif path.is_file():
        ckpt = _read_index(path) if path.name.endswith(".index.json") else _read_file(path)
        if path.name in HF_WEIGHT_FILES:
            ckpt.config = _read_config(path.parent)
    else:
        raise WeightLoadError(f"weight file not found: {path}")
    if ckpt.tensors and all(k.startswith(DATA_PARALLEL_PREFIX) for k in ckpt.tensors):
        ckpt.tensors = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in ckpt.tensors.items()}
        ckpt.stripped_prefix = DATA_PARALLEL_PREFIX
    return ckpt


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path).tensors
