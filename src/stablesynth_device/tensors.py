"""Safetensors files read and written with numpy alone (the device has no ``safetensors`` wheel to rely on).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
N bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the tensors' bytes. Only the dtypes a bundle holds are read (F32, F16, I8,
I64); anything else, overlapping or out-of-range offsets, or a header that does not parse is a
:class:`TensorFileError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np

_DTYPES: Final[dict[str, np.dtype]] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"),
                                       "I64": np.dtype("<i8")}
_NAMES: Final = {v: k for k, v in _DTYPES.items()}
#: A bundle's tensor files hold a few MB; a header larger than this is not one of ours.
MAX_HEADER_BYTES: Final = 16 << 20


class TensorFileError(ValueError):
    """A tensor file that is missing, truncated or not safetensors of the expected dtypes."""


def read_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (each its own array) and the ``__metadata__`` of a safetensors file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TensorFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) < 8:
        raise TensorFileError(f"{path}: {len(data)} bytes, too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise TensorFileError(f"{path}: header length {n} does not fit the file's {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TensorFileError(f"{path}: key {name!r}: bad entry {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise TensorFileError(f"{path}: key {name!r}: dtype {dtype!r} (expected one of {', '.join(_DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise TensorFileError(f"{path}: key {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise TensorFileError(f"{path}: key {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        size = math.prod(shape) * _DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != size:
            raise TensorFileError(f"{path}: key {name!r}: data_offsets {offsets} do not hold {size} bytes "
                                  f"of a {len(body)}-byte body")
        out[name] = np.frombuffer(body, _DTYPES[dtype], math.prod(shape), begin).reshape(shape).copy()
    return out, dict(meta)


def tensor_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` serialised as a safetensors file (names in sorted order, as the reference writer does)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    parts, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.newbyteorder("<") not in _NAMES:
            raise TypeError(f"{name}: dtype {arr.dtype} cannot be written")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype.newbyteorder("<")], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        parts.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the reference writer aligns the body to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(parts)


def write_tensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tensor_bytes(tensors, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
