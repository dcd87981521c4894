"""Wire protocol between the cloud service and the device.

A reply is one self-describing frame::

    magic     4 B   b"SSYN"
    version   u16   PROTOCOL_VERSION (little-endian)
    hlen      u32   length of the JSON header in bytes
    hcrc      u32   CRC32 of the JSON header bytes
    header    hlen  UTF-8 JSON: model_id, model_version, encoding, tensors
                    [{name, dtype, shape}], payload_length, checksum,
                    payload_checksum; then spaces up to a multiple of 16 bytes
    payload         the tensors' bytes, little-endian, concatenated in header order

The header has its own CRC so a flipped byte in it is reported as a checksum
failure instead of being parsed into a plausible but wrong description. The
payload is covered by the checksum the header names (:data:`CHECKSUMS`):
``crc32`` (8 hex digits; what the server sends: it detects every error burst of up
to 32 bits and any other corruption with probability 1 − 2⁻³², and costs a
third of SHA-256) or ``sha256`` (64 hex digits). Neither authenticates the
sender: an unkeyed digest can be recomputed by whoever alters the bytes, which
TLS prevents. Protocol version 1 carried ``payload_sha256`` only; this build
speaks version 2 alone. Every failure is a :class:`ProtocolError` subclass;
:func:`decode` never returns a tensor it has not verified.

Encodings and their maximum error against the fp32 tensors the cloud computed:

=========  ==================================================================
fp32       exact (bit for bit).
fp16       |x̂ − x| ≤ 2⁻¹¹·|x| for |x| ≥ 2⁻¹⁴, ≤ 2⁻²⁵ below (subnormals);
           values beyond ±65504 are refused at encode time.
int8       symmetric, one fp32 scale per row (last dimension; a 1-D tensor is
           one row): s = max|row|/127, |x̂ − x| ≤ s/2 (+ fp32 rounding, which is
           absolute, up to 128·2⁻¹⁴⁹, for a row of subnormals).
factors    the generator's ``factors(driver)`` in fp32, exact; the device
           rebuilds Θ_d with ``expand`` from its cached ``shared()`` tensors,
           so Θ_d equals the cloud's up to float summation order.
driver     the driver vector d in fp32, exact; the device runs the generator.
=========  ==================================================================

Upload (device → cloud): 192 little-endian float32 (768 B) with
``Content-Type: application/octet-stream``, or JSON ``{"feature": [192 numbers]}``;
see :mod:`stablesynth_device.wire.uploads`.

This module is the wire alone: numpy and the standard library, no PyTorch, nothing of the
cloud or the device runtime. The cloud writes frames with :mod:`stablesynth.cloud.framing`;
the device reads them with :func:`decode`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from stablesynth_device.wire.crc import crc32

MAGIC: Final = b"SSYN"
PROTOCOL_VERSION: Final = 2
MEDIA_TYPE: Final = "application/vnd.stablesynth"
#: The request header in which a device names the model version its bundle holds (409 on a mismatch).
VERSION_HEADER: Final = "X-Model-Version"
#: The native adapt route; ``{model}`` is the model id, ``?encoding=`` one of :data:`ENCODINGS`.
ADAPT_PATH: Final = "/v1/models/{model}/adapt"
#: A header describes a handful of tensors; anything larger is not one of ours.
MAX_HEADER_BYTES: Final = 64 * 1024
#: Upper bound on elements per reply (far above 97·K for every preset) so a bad header cannot ask for GBs.
MAX_ELEMENTS: Final = 1 << 28

_PREFIX = struct.Struct("<4sHII")
PREFIX_BYTES: Final = _PREFIX.size

Encoding = Literal["fp32", "fp16", "int8", "factors", "driver"]
ENCODINGS: Final[tuple[str, ...]] = ("fp32", "fp16", "int8", "factors", "driver")
#: Encodings whose payload is Θ_d itself (as opposed to factors or the driver).
PARAM_ENCODINGS: Final[tuple[str, ...]] = ("fp32", "fp16", "int8")

_DTYPES: Final[dict[str, np.dtype]] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "i8": np.dtype("i1"),
}
_SCALE_SUFFIX: Final = "::scale"
FP16_MAX: Final = 65504.0
#: Payload checksums a frame may name, and the hex digits of each.
CHECKSUMS: Final[dict[str, int]] = {"crc32": 8, "sha256": 64}
DEFAULT_CHECKSUM: Final = "crc32"
#: The header is padded with spaces so the payload starts at a multiple of this many bytes.
PAYLOAD_ALIGN: Final = 16
_HEX: Final = frozenset("0123456789abcdef")
_HEADER_KEYS: Final = frozenset({"model_id", "model_version", "encoding", "tensors", "payload_length",
                                 "checksum", "payload_checksum"})


def payload_checksum(algorithm: str, payload: bytes | memoryview) -> str:
    """The hex checksum of ``payload`` under ``algorithm`` (one of :data:`CHECKSUMS`)."""
    if algorithm == "crc32":
        return f"{crc32(payload):08x}"
    if algorithm == "sha256":
        return hashlib.sha256(payload).hexdigest()
    raise ValueError(f"unknown checksum {algorithm!r} (known: {', '.join(CHECKSUMS)})")


class ProtocolError(ValueError):
    """A frame that cannot be trusted; subclasses say why."""


class BadMagic(ProtocolError):  # noqa: N818 (names from the protocol spec)
    """The frame does not start with ``b"SSYN"``: not a stablesynth reply at all."""


class UnsupportedVersion(ProtocolError):  # noqa: N818 (names from the protocol spec)
    """The frame uses a protocol version this code does not speak."""


class ModelMismatch(ProtocolError):  # noqa: N818 (names from the protocol spec)
    """The frame was produced by a different model id or model version than expected."""


class ChecksumMismatch(ProtocolError):  # noqa: N818 (names from the protocol spec)
    """Header CRC32 or payload checksum differs: the bytes were corrupted."""


class Truncated(ProtocolError):  # noqa: N818 (names from the protocol spec)
    """The frame is shorter than its header says."""


class BadHeader(ProtocolError):  # noqa: N818 (names from the protocol spec)
    """The header is well-formed bytes but describes an impossible frame."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Header:
    protocol_version: int
    model_id: str
    model_version: str
    encoding: str
    tensors: tuple[TensorInfo, ...]
    payload_length: int
    checksum: str
    payload_checksum: str

    def to_json(self) -> bytes:
        return json.dumps({
            "model_id": self.model_id,
            "model_version": self.model_version,
            "encoding": self.encoding,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.tensors],
            "payload_length": self.payload_length,
            "checksum": self.checksum,
            "payload_checksum": self.payload_checksum,
        }, separators=(",", ":"), sort_keys=True).encode("utf-8")


# ----------------------------------------------------------------------------- decode


def _parse_header(raw: bytes) -> Header:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadHeader(f"header is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadHeader("header is not a JSON object")
    if set(obj) != _HEADER_KEYS:
        missing, extra = sorted(_HEADER_KEYS - set(obj)), sorted(set(obj) - _HEADER_KEYS)
        raise BadHeader(f"header fields: missing {missing}, unexpected {extra}")
    model_id, model_version = obj["model_id"], obj["model_version"]
    encoding, tensors = obj["encoding"], obj["tensors"]
    length, algorithm, digest = obj["payload_length"], obj["checksum"], obj["payload_checksum"]
    if not (isinstance(model_id, str) and isinstance(model_version, str) and isinstance(digest, str)):
        raise BadHeader("model_id, model_version and payload_checksum must be strings")
    if not isinstance(algorithm, str) or algorithm not in CHECKSUMS:
        raise BadHeader(f"unknown checksum {algorithm!r}")
    if len(digest) != CHECKSUMS[algorithm] or not _HEX.issuperset(digest):
        raise BadHeader(f"payload_checksum is not {CHECKSUMS[algorithm]} lower-case hex digits")
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise BadHeader(f"unknown encoding {encoding!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise BadHeader(f"bad payload_length {length!r}")
    if not isinstance(tensors, list):
        raise BadHeader("tensors must be a list")
    infos: list[TensorInfo] = []
    total = 0
    for t in tensors:
        if not isinstance(t, dict) or set(t) != {"name", "dtype", "shape"}:
            raise BadHeader(f"bad tensor entry {t!r}")
        name, dtype, shape = t["name"], t["dtype"], t["shape"]
        if not (isinstance(name, str) and isinstance(dtype, str) and dtype in _DTYPES and isinstance(shape, list)):
            raise BadHeader(f"bad tensor entry {t!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ELEMENTS for s in shape):
            raise BadHeader(f"bad shape {shape!r} for {name!r}")
        info = TensorInfo(name, dtype, tuple(shape))
        total += math.prod(info.shape)
        if total > MAX_ELEMENTS:
            raise BadHeader("frame describes more elements than any model sends")
        infos.append(info)
    if len({i.name for i in infos}) != len(infos):
        raise BadHeader("duplicate tensor names")
    if sum(i.nbytes for i in infos) != length:
        raise BadHeader("tensor sizes do not add up to payload_length")
    return Header(PROTOCOL_VERSION, model_id, model_version, encoding, tuple(infos), length, algorithm, digest)


def decode_header(data: bytes) -> tuple[Header, int]:
    """Verify magic, version, header CRC and parse the header; returns it and the payload offset."""
    if len(data) < len(MAGIC):
        if MAGIC.startswith(bytes(data)):
            raise Truncated(f"frame of {len(data)} bytes ends inside the magic")
        raise BadMagic("not a stablesynth frame")
    if bytes(data[:4]) != MAGIC:
        raise BadMagic(f"not a stablesynth frame (starts with {bytes(data[:4])!r})")
    if len(data) < PREFIX_BYTES:
        raise Truncated(f"frame of {len(data)} bytes ends inside the fixed prefix")
    _, version, hlen, hcrc = _PREFIX.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version}; this build speaks {PROTOCOL_VERSION}")
    if hlen > MAX_HEADER_BYTES:
        raise BadHeader(f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
    end = PREFIX_BYTES + hlen
    if len(data) < end:
        raise Truncated(f"frame ends inside the header ({len(data)} < {end} bytes)")
    raw = bytes(data[PREFIX_BYTES:end])
    if zlib.crc32(raw) != hcrc:
        raise ChecksumMismatch("header CRC32 mismatch")
    try:
        return _parse_header(raw), end
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise BadHeader(f"malformed header ({type(exc).__name__}: {exc})") from None


def decode(data: bytes | bytearray | memoryview, expect_model_id: str | None = None,
           expect_version: str | None = None) -> tuple[dict[str, np.ndarray], Header]:
    """Verify and decode a frame; returns float32 arrays (each its own copy) and the header.

    For ``fp16``/``int8`` the tensors are de-quantized; for ``factors`` and
    ``driver`` they are what the cloud sent (the caller expands them). Whatever the
    bytes, the only exception raised is a :class:`ProtocolError` subclass.
    """
    try:
        return _decode(data, expect_model_id, expect_version)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError, IndexError, RecursionError, struct.error) as exc:
        # A header that passed its CRC yet describes something no encoder writes.
        raise BadHeader(f"malformed frame ({type(exc).__name__}: {exc})") from None


def _decode(data: bytes | bytearray | memoryview, expect_model_id: str | None,
            expect_version: str | None) -> tuple[dict[str, np.ndarray], Header]:
    header, offset = decode_header(data)
    if expect_model_id is not None and header.model_id != expect_model_id:
        raise ModelMismatch(f"frame is for model {header.model_id!r}, expected {expect_model_id!r}")
    if expect_version is not None and header.model_version != expect_version:
        raise ModelMismatch(
            f"frame is for {header.model_id!r} version {header.model_version!r}, expected {expect_version!r}")
    available = len(data) - offset
    if available < header.payload_length:
        raise Truncated(f"payload has {available} of {header.payload_length} bytes")
    if available > header.payload_length:
        raise BadHeader(f"{available - header.payload_length} bytes after the payload")
    payload = memoryview(data)[offset:]
    if payload_checksum(header.checksum, payload) != header.payload_checksum:
        raise ChecksumMismatch(f"payload {header.checksum} mismatch")
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for info in header.tensors:
        arrays[info.name] = np.frombuffer(payload, _DTYPES[info.dtype], math.prod(info.shape),
                                          pos).reshape(info.shape)
        pos += info.nbytes
    return _reconstruct(arrays, header), header


def _reconstruct(arrays: dict[str, np.ndarray], header: Header) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    expect = "i8" if header.encoding == "int8" else "f16" if header.encoding == "fp16" else "f32"
    for info in header.tensors:
        if info.name.endswith(_SCALE_SUFFIX):
            if header.encoding != "int8" or info.dtype != "f32":
                raise BadHeader(f"unexpected scale tensor {info.name!r}")
            continue
        if info.dtype != expect:
            raise BadHeader(f"{header.encoding} frame holds {info.dtype} tensor {info.name!r}")
        x = arrays[info.name]
        if header.encoding == "int8":
            scale = arrays.get(info.name + _SCALE_SUFFIX)
            rows = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
            if scale is None or scale.shape != (rows,) or len(info.shape) == 0:
                raise BadHeader(f"int8 tensor {info.name!r} lacks a matching per-row scale")
            if not np.isfinite(scale).all() or (scale < 0).any():
                raise BadHeader(f"bad scales for {info.name!r}")
            x = (x.reshape(rows, info.shape[-1]).astype(np.float32) * scale[:, None]).reshape(info.shape)
        y = np.array(x, dtype=np.float32)
        if not np.isfinite(y).all():
            raise BadHeader(f"tensor {info.name!r} holds NaN or Inf")
        out[info.name] = y
    return out


def max_error(encoding: str, reference: np.ndarray) -> np.ndarray:
    """Element-wise bound on |decoded − reference| that ``encoding`` guarantees (see module doc)."""
    ref = np.asarray(reference, dtype=np.float32)
    if encoding in ("fp32", "factors", "driver"):
        return np.zeros_like(ref)
    if encoding == "fp16":
        return np.maximum(np.abs(ref) * np.float32(2.0**-11), np.float32(2.0**-25))
    if encoding == "int8":
        rows = ref.reshape(1, -1) if ref.ndim <= 1 else ref.reshape(-1, ref.shape[-1])
        row_max = np.abs(rows).max(axis=1, keepdims=True) if rows.size else np.zeros((rows.shape[0], 1), np.float32)
        # fp32 rounding of x/s, rint and q·s adds a few ulps of the row maximum.
        bound = row_max / np.float32(254.0) * np.float32(1 + 1e-5) + row_max * np.float32(4 * 2.0**-24)
        # A row of subnormals has a subnormal scale, whose rounding is absolute (2^-149 per unit of q).
        bound = bound + np.float32(128 * 2.0**-149)
        return np.broadcast_to(bound, rows.shape).reshape(ref.shape).astype(np.float32)
    raise ValueError(f"unknown encoding {encoding!r}")
