"""Writing reply frames (the format is in :mod:`stablesynth.serving.protocol`).

A Θ_d reply at K = 1501 is 582 KB, and every pass over it costs: the server's share of a
reply is roughly generate, convert, checksum, send. :class:`FrameWriter` therefore writes
each frame once:

- the header (and where its checksum goes) is built once per model, encoding and shapes;
  per frame only the checksum's hex digits and the header CRC are new;
- the header is padded so the payload starts aligned, and each tensor is written straight
  into the frame by one operation (fp32 a copy, fp16 PyTorch's F16C conversion, int8 the
  rounded quotients of one temporary), with no copy of the finished payload;
- what makes a sample unsendable (NaN/Inf, beyond the fp16 range) is found with one
  min/max reduction per tensor, and a bad sample gets its ``ValueError`` in its place;
- the payload checksum is CRC32 by default, computed right after the payload is written,
  while it is still in the CPU cache.

A Θ_d frame is a ``memoryview`` of a buffer of its own, so it lives exactly as long as whoever
sends it holds it; small frames of one batch (factors, driver) share one buffer, written with
one operation per tensor for the whole batch.
"""

from __future__ import annotations

import functools
import math
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from stablesynth.serving.protocol import (
    _PREFIX,
    _SCALE_SUFFIX,
    CHECKSUMS,
    DEFAULT_CHECKSUM,
    ENCODINGS,
    FP16_MAX,
    MAGIC,
    PAYLOAD_ALIGN,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    Header,
    TensorInfo,
    payload_checksum,
)


@dataclass(frozen=True)
class _Part:
    """One tensor of the payload: where it goes, and from which input tensor (``kind``)."""

    info: TensorInfo
    source: int  # index of the input tensor
    kind: str  # "values" (f32/f16 of the input), "int8", "scale" (the int8 scales of the input)
    offset: int  # from the payload start


@dataclass(frozen=True)
class _Layout:
    parts: tuple[_Part, ...]
    template: bytes  # the header JSON, padded, with a placeholder checksum
    digest_at: int  # where the checksum's hex digits start in the frame
    start: int  # payload offset in the frame
    size: int  # frame size


def _as_tensor(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32, on the CPU, contiguous (no copy when it already is)."""
    if isinstance(t, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
    t = t.detach()
    if t.dtype != torch.float32 or t.device.type != "cpu":
        t = t.to("cpu", torch.float32)
    return t.contiguous()


@functools.lru_cache(maxsize=256)
def _layout(encoding: str, shapes: tuple[tuple[str, tuple[int, ...]], ...], model_id: str, model_version: str,
            checksum: str) -> _Layout:
    parts: list[_Part] = []
    offset = 0

    def add(info: TensorInfo, source: int, kind: str) -> None:
        nonlocal offset
        parts.append(_Part(info, source, kind, offset))
        offset += info.nbytes

    for i, (name, shape) in enumerate(shapes):
        if _SCALE_SUFFIX in name:
            raise ValueError(f"tensor name {name!r} may not contain {_SCALE_SUFFIX!r}")
        if encoding == "int8":
            shape = shape or (1,)
            add(TensorInfo(name, "i8", shape), i, "int8")
            add(TensorInfo(name + _SCALE_SUFFIX, "f32", (math.prod(shape[:-1]),)), i, "scale")
        else:
            add(TensorInfo(name, "f16" if encoding == "fp16" else "f32", shape), i, "values")
    digits = CHECKSUMS[checksum]
    hjson = Header(PROTOCOL_VERSION, model_id, model_version, encoding, tuple(p.info for p in parts), offset,
                   checksum, "0" * digits).to_json()
    placeholder = b'"payload_checksum":"' + b"0" * digits + b'"'
    if hjson.count(placeholder) != 1:  # inside a JSON string a quote is escaped: only the key matches
        raise RuntimeError("header placeholder is not unique")
    template = hjson + b" " * (-(PREFIX_BYTES + len(hjson)) % PAYLOAD_ALIGN)  # JSON allows trailing blanks
    start = PREFIX_BYTES + len(template)
    return _Layout(tuple(parts), template, PREFIX_BYTES + hjson.index(placeholder) + len(placeholder) - digits - 1,
                   start, start + offset)


#: Below this scale the reciprocal of a row's int8 scale is not exact enough (or overflows): divide.
_TINY_SCALE = np.float32(2.0**-100)
#: Batches of frames up to this many bytes in all are written into one buffer, larger ones frame by frame.
BATCH_BUFFER_BYTES = 4 << 20
_NAN_OR_INF = "tensor {!r} has NaN or Inf; refusing to send it"
_FP16_RANGE = "tensor {!r} exceeds the fp16 range (±" + f"{FP16_MAX:g}" + "); use fp32 or int8"

# Small vectors (scales, per-sample flags) are handled in numpy, whose per-call cost is a
# fraction of PyTorch's; PyTorch does the passes over Θ_d itself, where it is faster.


def _quantise(rows: torch.Tensor, dst: np.ndarray) -> np.ndarray:
    """Symmetric per-row int8 of ``rows`` ``[B, r, c]`` written into ``dst`` (int8, same shape);
    returns the scales ``[B, r]`` (NaN/Inf where a row holds NaN/Inf; its bytes are then meaningless)."""
    if rows.numel() == 0:
        return np.zeros(rows.shape[:2], np.float32)
    scale = np.maximum(rows.amax(dim=2).numpy(), -rows.amin(dim=2).numpy()) / np.float32(127)
    finite = np.isfinite(scale)
    safe = np.where((scale > 0) & finite, scale, np.float32(1))
    if not finite.all():  # a sample that will be refused; its batch-mates are still written
        rows = torch.nan_to_num(rows, 0.0, 0.0, 0.0)
    if safe.min() >= _TINY_SCALE:
        # x · (1/s) is within 2 ulp of x / s (|q| <= 127: inside the documented bound), and cheaper;
        # |x / s| <= 127 up to that rounding, so no clamp is needed.
        q = torch.mul(rows, torch.from_numpy(np.reciprocal(safe))[..., None]).round_()
    else:  # tiny (subnormal) scales round coarsely: divide, and clamp what rounds beyond ±127
        q = torch.div(rows, torch.from_numpy(safe)[..., None]).round_().clamp_(-127, 127)
    torch.from_numpy(dst).copy_(q)
    return scale


class FrameWriter:
    """Writes frames of one model version in one encoding (and payload checksum)."""

    def __init__(self, encoding: str, model_id: str, model_version: str, checksum: str = DEFAULT_CHECKSUM) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        if checksum not in CHECKSUMS:
            raise ValueError(f"unknown checksum {checksum!r} (known: {', '.join(CHECKSUMS)})")
        if sys.byteorder != "little":
            raise RuntimeError("the frame writer needs a little-endian host")
        self.encoding, self.checksum = encoding, checksum
        self.model_id, self.model_version = str(model_id), str(model_version)

    def write(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> memoryview | ValueError:
        """One frame of unbatched tensors ``{name: tensor}``, or why it cannot be sent."""
        return self._frames(list(tensors), [_as_tensor(t).unsqueeze(0) for t in tensors.values()])[0]

    def write_batch(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> list[memoryview | ValueError]:
        """One frame (or ``ValueError``) per sample of batched tensors ``{name: [B, *shape]}``.

        Small frames are converted for the whole batch at once, into one buffer; large ones
        one after the other, each into its own buffer, so each stays in the CPU cache."""
        values = [_as_tensor(t) for t in tensors.values()]
        sizes = {t.shape[0] if t.dim() else -1 for t in values}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError("batched tensors need one shared leading batch dimension")
        names, batch = list(tensors), sizes.pop()
        if batch == 0:
            return []
        if batch * sum(4 * t[0].numel() for t in values) <= BATCH_BUFFER_BYTES:
            return self._frames(names, values)
        return [self._frames(names, [t[i:i + 1] for t in values])[0] for i in range(batch)]

    def _frames(self, names: list[str], values: list[torch.Tensor]) -> list[memoryview | ValueError]:
        """Frames of ``[B, *shape]`` tensors, all written into one buffer (one op per tensor)."""
        batch = values[0].shape[0]
        layout = _layout(self.encoding, tuple((n, tuple(v.shape[1:])) for n, v in zip(names, values)),
                         self.model_id, self.model_version, self.checksum)
        buf = np.empty((batch, layout.size), np.uint8)
        why: list[str | None] = [None] * batch
        for part in layout.parts:
            x, name, info = values[part.source], names[part.source], part.info
            dst = buf[:, layout.start + part.offset:layout.start + part.offset + info.nbytes]
            if part.kind == "int8":
                shape = (batch, math.prod(info.shape[:-1]), info.shape[-1])
                scale = _quantise(x.reshape(shape), dst.reshape(shape).view(np.int8))
            elif part.kind == "scale":
                dst.view("<f4")[...] = scale.reshape(batch, -1)
                for i in np.flatnonzero(~np.isfinite(scale).all(axis=1)):
                    why[i] = why[i] or _NAN_OR_INF.format(name)
                continue
            elif x.numel():
                flat = x.reshape(batch, -1)
                if batch == 1:
                    lo, hi = (np.array([float(v)]) for v in torch.aminmax(flat))
                else:
                    lo, hi = flat.amin(dim=1).numpy(), flat.amax(dim=1).numpy()
                bad = ~(np.isfinite(lo) & np.isfinite(hi))
                for i in np.flatnonzero(bad):
                    why[i] = why[i] or _NAN_OR_INF.format(name)
                if info.dtype == "f16":
                    for i in np.flatnonzero(~bad & (np.maximum(-lo, hi) > FP16_MAX)):
                        why[i] = why[i] or _FP16_RANGE.format(name)
                if batch == 1 and why[0] is not None:
                    break
                if info.dtype == "f16":  # PyTorch converts with the CPU's F16C instructions, numpy does not
                    torch.from_numpy(dst.view("<f2")).copy_(flat)
                else:
                    dst.view("<f4")[...] = flat.numpy()
        out: list[memoryview | ValueError] = []
        view = memoryview(buf.reshape(-1))
        for i in range(batch):
            if why[i] is not None:
                out.append(ValueError(why[i]))
                continue
            frame = view[i * layout.size:(i + 1) * layout.size]
            digest = payload_checksum(self.checksum, frame[layout.start:]).encode("ascii")
            frame[PREFIX_BYTES:layout.start] = layout.template
            frame[layout.digest_at:layout.digest_at + len(digest)] = digest
            _PREFIX.pack_into(frame, 0, MAGIC, PROTOCOL_VERSION, len(layout.template),
                              zlib.crc32(frame[PREFIX_BYTES:layout.start]))
            out.append(frame)
        return out
