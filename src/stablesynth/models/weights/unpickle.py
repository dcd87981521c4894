"""Reading PyTorch's pickled checkpoints (``.ckpt``, ``.pth``, ``.bin``) without running their code.

A pickle is a small program: a GLOBAL opcode imports any callable by name and REDUCE calls it,
which is how a downloaded checkpoint can run ``os.system`` the moment ``torch.load`` opens it.
:class:`RestrictedUnpickler` resolves globals only from :data:`ALLOWED` -- tensors, their
storages and dtypes, plain containers, and the two attribute containers real checkpoints carry
(Lightning's ``AttributeDict`` of hyper-parameters, read back as a plain dict, and DeiT's
``argparse.Namespace`` of training arguments, read back as plain attributes). Any other name
raises :class:`UnsafePickleError` when its GLOBAL opcode is read, before the REDUCE that would
call it, so nothing of the file has run. ``BUILD`` (which would call ``__setstate__``) only sets
plain attributes, on those containers and on ``OrderedDict`` (a ``state_dict()``'s ``_metadata``).
Tensors are rebuilt by the functions here, which check every offset against the bytes the file
really holds.

Both of ``torch.save``'s formats are read: the zip archive (``<name>/data.pkl`` plus one file per
storage under ``<name>/data/``, PyTorch 1.6 on) and the legacy stream (magic number, protocol,
system info, the pickle, the storage keys, then each storage's bytes). The pre-1.0 tar format is
refused. Only little-endian files are read (every PyTorch build writes them).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch

from stablesynth.models.weights.errors import UnsafePickleError, WeightLoadError

#: The legacy (pre-zip) stream's first pickled value and its protocol marker (torch/serialization.py).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: ``torch.<Name>Storage`` classes that name a storage's element type in a persistent id.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class StorageType:
    """What ``torch.FloatStorage`` & co. unpickle to: only the element type (they are never called)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class Storage:
    """One storage's elements as a flat tensor; every tensor of the checkpoint is a view into one."""

    def __init__(self, key: str, flat: torch.Tensor) -> None:
        self.key = key
        self.flat = flat


class PlainDict(dict):  # type: ignore[type-arg]
    """Lightning's ``AttributeDict`` (hyper-parameters), read back as a plain dict."""


class PlainNamespace:
    """``argparse.Namespace`` (DeiT's training arguments), read back as plain attributes."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``: a view of ``storage``, every index checked to lie inside it."""
    if not isinstance(storage, Storage):
        raise UnsafePickleError(f"a tensor's storage is a {type(storage).__name__}, not a checkpoint storage")
    ints = (storage_offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if (ints is None or len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in ints)):
        raise UnsafePickleError(f"storage {storage.key!r}: a tensor with a malformed offset/size/stride")
    if backward_hooks or metadata:
        raise UnsafePickleError(f"storage {storage.key!r}: a tensor with backward hooks or metadata")
    numel = storage.flat.numel()
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise WeightLoadError(f"storage {storage.key!r}: a tensor of shape {list(size)} reaches element "
                                  f"{last}, the storage holds {numel}")
    return storage.flat.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter(_with_state)``: the parameter's tensor (a Parameter is only a tensor here)."""
    if not isinstance(data, torch.Tensor) or backward_hooks or state:
        raise UnsafePickleError("a parameter that is not a plain tensor (or carries hooks or state)")
    return data


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for ``bytes``; only its latin-1 use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode called other than on a latin-1 string")
    return text.encode("latin1")


_ATTRIBUTE_DICTS = (
    ("pytorch_lightning.utilities.parsing", "AttributeDict"),
    ("lightning_fabric.utilities.data", "AttributeDict"),
    ("lightning.fabric.utilities.data", "AttributeDict"),
    ("lightning.pytorch.utilities.parsing", "AttributeDict"),
)
_DTYPE_NAMES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long",
                "int32", "int", "int16", "short", "int8", "uint8", "bool")

#: Every global a checkpoint may name, and what it resolves to. Nothing else is ever imported.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): PlainNamespace,
    **{("torch", name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): getattr(torch, name) for name in _DTYPE_NAMES},
    **{key: PlainDict for key in _ATTRIBUTE_DICTS},
}


#: The only types whose state (``BUILD``) a checkpoint may set, as plain attributes: a module's
#: ``state_dict()`` is an OrderedDict carrying ``_metadata`` (its modules' versions) that way.
_STATEFUL = (collections.OrderedDict, PlainDict, PlainNamespace)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose globals come only from :data:`ALLOWED` (see the module's docstring).

    It subclasses the pure-Python unpickler, whose opcode table can be narrowed: ``BUILD`` here
    accepts only :data:`_STATEFUL` and sets plain attributes (no ``__setstate__`` is called).
    ``storage(pid)`` resolves ``torch.save``'s persistent ids; without it a persistent id is refused.
    """

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, source: str,
                 storage: Callable[[tuple[Any, ...]], Storage] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.source = source
        self.storage = storage

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # protocol 2 spells builtins "__builtin__" (as pickle maps it)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle: it names {module}.{name}, which is not on the allow-list "
                "(tensors, storages, dtypes, plain containers, Lightning hyper-parameters); nothing in the file "
                "was run") from None

    def persistent_load(self, pid: Any) -> Any:
        if self.storage is None or not isinstance(pid, tuple):
            raise UnsafePickleError(f"{self.source}: refused to unpickle: an unexpected persistent id")
        return self.storage(pid)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in _STATEFUL or not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(f"{self.source}: refused to unpickle: it sets the state of a "
                                    f"{type(inst).__name__}, which only plain containers may have")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build


def _storage_pid(pid: tuple[Any, ...], source: str, length: int) -> tuple[str, torch.dtype, int]:
    """Check a persistent id ``('storage', type, key, location, numel, ...)``; its key, dtype and numel."""
    if (len(pid) != length or pid[0] != "storage" or not isinstance(pid[1], StorageType)
            or not isinstance(pid[2], str) or not isinstance(pid[3], str) or type(pid[4]) is not int or pid[4] < 0):
        raise UnsafePickleError(f"{source}: refused to unpickle: a malformed storage id {pid[:1]!r}")
    return pid[2], pid[1].dtype, pid[4]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _unpickle(data: bytes | BinaryIO, source: str, storage: Callable[[tuple[Any, ...]], Storage] | None) -> Any:
    """One pickle through the restricted unpickler; a malformed one is a WeightLoadError, not a crash."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return RestrictedUnpickler(file, source, storage).load()
    except WeightLoadError:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        raise WeightLoadError(f"{source}: truncated or not a pickle ({exc or type(exc).__name__})") from None
    except Exception as exc:  # a malformed opcode stream raises almost anything
        raise WeightLoadError(f"{source}: not a readable checkpoint pickle ({type(exc).__name__}: {exc})") from None


def _load_zip(path: Path) -> Any:
    source = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightLoadError(f"{source}: truncated or not a PyTorch zip checkpoint ({exc})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightLoadError(f"{source}: a zip file, but not one written by torch.save "
                                  f"(expected one '<name>/data.pkl', found {len(pickles)})")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
            raise WeightLoadError(f"{source}: a big-endian checkpoint; only little-endian files are read")
        storages: dict[str, Storage] = {}

        def storage(pid: tuple[Any, ...]) -> Storage:
            key, dtype, numel = _storage_pid(pid, source, 5)
            if key not in storages:
                name = f"{prefix}data/{key}"
                try:
                    info = archive.getinfo(name)
                    expected = numel * _element_size(dtype)
                    if info.file_size != expected:
                        raise WeightLoadError(f"{source}: storage {key!r} holds {info.file_size} bytes, its tensor "
                                              f"needs {expected} (a damaged file)")
                    raw = bytearray(archive.read(name))
                except KeyError:
                    raise WeightLoadError(f"{source}: storage {key!r} is missing from the archive") from None
                except zipfile.BadZipFile as exc:
                    raise WeightLoadError(f"{source}: storage {key!r} is damaged ({exc})") from None
                flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                storages[key] = Storage(key, flat)
            return storages[key]

        return _unpickle(archive.read(pickles[0]), source, storage)


def _load_legacy(path: Path) -> Any:
    source = str(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        if _unpickle(f, source, None) != LEGACY_MAGIC:
            raise WeightLoadError(f"{source}: not a PyTorch checkpoint (neither a zip archive nor the legacy "
                                  "format's magic number)")
        if _unpickle(f, source, None) != LEGACY_PROTOCOL:
            raise WeightLoadError(f"{source}: a legacy PyTorch checkpoint of an unknown protocol version")
        info = _unpickle(f, source, None)
        if not isinstance(info, Mapping) or not info.get("little_endian", False):
            raise WeightLoadError(f"{source}: a big-endian checkpoint; only little-endian files are read")
        pending: dict[str, Storage] = {}

        def storage(pid: tuple[Any, ...]) -> Storage:
            key, dtype, numel = _storage_pid(pid, source, 6)
            if pid[5] is not None:
                raise WeightLoadError(f"{source}: storage views of the pre-1.0 format are not supported")
            if numel * _element_size(dtype) > size:
                raise WeightLoadError(f"{source}: storage {key!r} claims {numel} elements, more than the file holds")
            if key not in pending:
                pending[key] = Storage(key, torch.empty(numel, dtype=dtype))
            return pending[key]

        obj = _unpickle(f, source, storage)
        keys = _unpickle(f, source, None)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise WeightLoadError(f"{source}: a legacy checkpoint without its list of storages")
        for key in keys:
            head = f.read(8)
            st = pending.pop(key, None)
            if len(head) < 8 or st is None:
                raise WeightLoadError(f"{source}: truncated (storage {key!r} is missing)")
            numel = struct.unpack("<q", head)[0]
            nbytes = st.flat.numel() * st.flat.element_size()
            raw = bytearray(f.read(nbytes))
            if numel != st.flat.numel() or len(raw) != nbytes:
                raise WeightLoadError(f"{source}: truncated (storage {key!r} holds {len(raw)} of {nbytes} bytes)")
            if nbytes:
                st.flat.copy_(torch.frombuffer(raw, dtype=st.flat.dtype))
        if pending:
            raise WeightLoadError(f"{source}: truncated (storage {next(iter(pending))!r} is missing)")
    return obj


def load_pickled_checkpoint(path: str | Path) -> Any:
    """The object ``torch.save`` wrote to ``path``, its tensors rebuilt; refuses anything off the allow-list."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return _load_zip(path)
    if head[257:262] == b"ustar":
        raise WeightLoadError(f"{path}: the pre-1.0 tar checkpoint format is not supported; re-save it with a "
                              "current PyTorch")
    return _load_legacy(path)


def to_plain(obj: Any) -> Any:
    """``obj`` with the attribute containers turned into dicts and tuples into lists (JSON-shaped)."""
    if isinstance(obj, PlainNamespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_plain(v) for v in obj), key=repr)
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 16 else f"<tensor {list(obj.shape)} {obj.dtype}>"
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, torch.dtype):
        return str(obj)
    return obj
