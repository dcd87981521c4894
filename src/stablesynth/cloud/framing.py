"""Writing reply frames, the cloud's half of the wire (the format is in :mod:`stablesynth_device.wire.protocol`).

A Θ_d reply at K = 1501 is 582 KB, and every pass over it costs: the server's share of a
reply is roughly generate, convert, checksum, send. :class:`FrameWriter` therefore writes
each frame once:

- the header (and where its checksum goes) is built once per model, encoding and shapes;
  per frame only the checksum's hex digits and the header CRC are new;
- the header is padded so the payload starts aligned; with :meth:`FrameWriter.write_into`
  the model computes fp32 tensors straight into the frame (no copy at all), fp16 and int8
  into a reused scratch buffer that is converted into the frame by one operation per tensor
  (fp16 PyTorch's F16C conversion, int8 the rounded products of the scratch itself);
- what makes a sample unsendable is found with one reduction per tensor: a sum for fp32 (only
  finite values have a finite sum), the converted bit patterns for fp16 (Inf, NaN and the
  largest magnitude are the highest patterns), the row scales themselves for int8; a bad
  sample gets its ``ValueError`` in its place;
- the payload checksum is CRC32 by default (:mod:`stablesynth_device.wire.crc`), computed right
  after the payload is written.

Θ_d frames are written a few at a time into one buffer of their own, as ``memoryview``s of it,
so it lives exactly as long as whoever sends them holds one; small frames of one batch
(factors, driver) share one buffer, written with one operation per tensor for the whole batch.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stablesynth_device.wire.protocol import (
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

#: A tensor ``base ⊙ row colᵀ`` of a batch: (base [r, c], row [B, r], col [B, c]), float32 arrays.
ScaledBase = tuple[np.ndarray, np.ndarray, np.ndarray]


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

    @property
    def direct(self) -> bool:
        """Whether each input tensor is sent as is (fp32, in order), so it can be computed in the frame."""
        return all(p.kind == "values" and p.info.dtype == "f32" for p in self.parts)


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
TINY_SCALE = np.float32(2.0**-100)
#: Tensors of up to this many elements (a bias) are quantised in numpy too (see the note below).
NUMPY_ELEMENTS = 1 << 14
#: Shapes (group sizes) whose views of its scratch buffer a thread keeps per writer.
_SCRATCH_SHAPES = 8
#: Batches of frames up to this many bytes in all are written into one buffer, larger ones frame by frame.
BATCH_BUFFER_BYTES = 4 << 20
_NAN_OR_INF = "tensor {!r} has NaN or Inf; refusing to send it"
_FP16_RANGE = "tensor {!r} exceeds the fp16 range (±" + f"{FP16_MAX:g}" + "); use fp32 or int8"

# Small vectors (scales, per-sample flags) are handled in numpy, whose per-call cost is a
# fraction of PyTorch's; PyTorch does the passes over Θ_d itself, where it is faster.


def _finite_rows(flat: torch.Tensor) -> np.ndarray:
    """Whether each row of ``flat`` ``[B, n]`` is all finite, in one pass: a sum is finite only if
    every term is (NaN and ±Inf propagate); a row whose sum overflowed is looked at element-wise."""
    finite = np.isfinite(flat.sum(dim=1).numpy())
    if not finite.all():
        for i in np.flatnonzero(~finite):
            finite[i] = bool(torch.isfinite(flat[i]).all())
    return finite


#: fp16 bit patterns from the largest finite magnitude (65504) up: ±Inf and NaN lie above it.
_FP16_TOP, _FP16_NEG_TOP = 0x7BFF, 0xFBFF


def _fp16_suspects(bits: np.ndarray) -> np.ndarray:
    """Rows of fp16 bit patterns ``[B, n]`` (int16) that may hold a value the fp16 encoding refuses.

    Converting is cheaper than checking the fp32 values first: a value beyond ±65520 (or NaN)
    converts to ±Inf (NaN); one in (65504, 65520) rounds to ±65504, which is also flagged here
    (as int16 the positive patterns are ordered by magnitude, as uint16 the negative ones), and
    :func:`_fp16_refusal` looks at the fp32 values of a flagged row."""
    return (bits.max(axis=1) >= _FP16_TOP) | (bits.view(np.uint16).max(axis=1) >= _FP16_NEG_TOP)


def _fp16_refusal(row: torch.Tensor, name: str) -> str | None:
    """Why the fp32 values ``row`` cannot be sent in fp16 (``None``: they can)."""
    if not bool(torch.isfinite(row).all()):
        return _NAN_OR_INF.format(name)
    return _FP16_RANGE.format(name) if float(row.abs().max()) > FP16_MAX else None


def _quantise(rows: torch.Tensor, dst: np.ndarray, scratch: bool = False) -> np.ndarray:
    """Symmetric per-row int8 of ``rows`` ``[B, r, c]`` written into ``dst`` (int8, same shape);
    returns the scales ``[B, r]`` (NaN/Inf where a row holds NaN/Inf; its bytes are then meaningless).
    ``scratch``: ``rows`` may be overwritten (no temporary of its size is allocated).

    Tensors of up to :data:`NUMPY_ELEMENTS` (a bias) are done in numpy, larger ones in PyTorch;
    both multiply, round half to even and convert alike, so the bytes are the same either way."""
    if rows.numel() == 0:
        return np.zeros(rows.shape[:2], np.float32)
    small = rows.numel() <= NUMPY_ELEMENTS
    if small:
        x = rows.numpy()
        hi, lo = x.max(axis=2), x.min(axis=2)
    else:  # two reductions: aminmax along a short last dimension is not vectorised and costs 10x more
        hi, lo = rows.amax(dim=2).numpy(), rows.amin(dim=2).numpy()
    scale = np.maximum(hi, -lo) / np.float32(127)
    usual = bool(scale.min() >= TINY_SCALE and np.isfinite(scale.max()))
    safe = scale if usual else np.where((scale > 0) & np.isfinite(scale), scale, np.float32(1))
    if not usual and not np.isfinite(scale).all():
        # A sample that will be refused; its batch-mates are still written.
        rows = torch.nan_to_num(rows, 0.0, 0.0, 0.0)
        x = rows.numpy()
    # x · (1/s) is within 2 ulp of x / s (|q| <= 127: inside the documented bound), and cheaper;
    # |x / s| <= 127 up to that rounding, so no clamp is needed. Tiny (subnormal) scales round
    # coarsely: there divide, and clamp what rounds beyond ±127.
    divide = not (usual or safe.min() >= TINY_SCALE)
    factor = (safe if divide else np.reciprocal(safe))[..., None]
    if small:
        q = np.rint(np.divide(x, factor) if divide else np.multiply(x, factor))
        dst[...] = np.clip(q, -127, 127) if divide else q
        return scale
    out = rows if scratch else None
    if divide:
        q = torch.div(rows, torch.from_numpy(factor), out=out).round_().clamp_(-127, 127)
    else:
        q = torch.mul(rows, torch.from_numpy(factor), out=out).round_()
    torch.from_numpy(dst).copy_(q)
    return scale


@functools.cache
def _kernels() -> Any:
    """The one-pass kernels, or None where they cannot run (then PyTorch computes the values).
    Imported on first use: numba takes a second to import."""
    try:
        from stablesynth.cloud import kernels
    except ImportError:
        return None
    return kernels if kernels.usable() else None


def _write_form(form: ScaledBase, part: _Part, buf: np.ndarray, start: int, x: torch.Tensor,
                bound: float) -> bool | np.ndarray:
    """Write a tensor ``base ⊙ row colᵀ`` into the payloads of ``buf`` at ``start`` in one pass
    (:mod:`stablesynth.cloud.kernels`). Returns True (written; fp32 values are the frames' own,
    ``x``), the row scales (int8, written), or False: the values were computed into ``x`` instead,
    for the usual conversion (fp16 values that may be out of its range, int8 rows of unusual scale)."""
    base, row, col = form
    kernels = _kernels()
    if kernels is not None:
        if part.info.dtype == "f32":
            kernels.scaled_fp32(base, row, col, buf, start)
            return True
        if part.info.dtype == "f16" and bound < FP16_MAX:
            kernels.scaled_fp16(base, row, col, buf, start)
            return True
        if part.kind == "int8":
            scales = np.empty(row.shape, np.float32)
            if kernels.scaled_int8(base, row, col, buf, start, scales):
                return scales
    torch.mul(torch.from_numpy(base), torch.from_numpy(row).unsqueeze(-1), out=x).mul_(
        torch.from_numpy(col).unsqueeze(1))
    return False


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
        self._local = threading.local()  # each thread's scratch for write_into

    def write(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> memoryview | ValueError:
        """One frame of unbatched tensors ``{name: tensor}``, or why it cannot be sent."""
        names, values = list(tensors), [_as_tensor(t).unsqueeze(0) for t in tensors.values()]
        layout = self._layout({n: tuple(v.shape[1:]) for n, v in zip(names, values)})
        buf = np.empty((1, layout.size), np.uint8)
        return self._seal(buf, layout, self._convert(buf, layout, names, values))[0]

    def write_into(self, shapes: Mapping[str, tuple[int, ...]], fill: Callable[[dict[str, torch.Tensor]], object],
                   count: int = 1, bounds: np.ndarray | None = None,
                   scaled: Mapping[str, ScaledBase] | None = None) -> list[memoryview | ValueError]:
        """``count`` frames of tensors that ``fill`` computes into the float32 tensors
        ``{name: [count, *shape]}`` it is given; each frame, or why it cannot be sent.

        In fp32 (and the other encodings sent as fp32) these tensors are the frames' own payloads,
        so the tensors are computed in place and never copied; otherwise they are a scratch buffer
        of the calling thread (reused, so it stays in the CPU cache), converted into the frames.
        The frames share one buffer: written a few at a time, they share PyTorch's cost per
        operation (5–10 µs a call on a busy machine, a third of a pass over a 582 KB Θ_d).

        ``bounds`` (``[count]``, optional): an upper bound on every |value| ``fill`` writes for
        each frame, known beforehand (e.g. from a generator's factors). Where every bound is
        finite, and for fp16 within its range, the checks such values cannot fail are skipped.

        ``scaled`` (optional): tensors of the form ``base ⊙ row colᵀ`` as ``{name: (base [r, c],
        row [count, r], col [count, c])}`` (float32 numpy arrays), which are written straight into
        the frames in their encoding (:mod:`stablesynth.cloud.kernels`, one pass) and are not
        asked of ``fill``."""
        names = list(shapes)
        layout = self._layout({n: tuple(shapes[n]) for n in names})
        buf = np.empty((count, layout.size), np.uint8)
        if layout.direct:
            values = [torch.from_numpy(buf[:, layout.start + p.offset:layout.start + p.offset + p.info.nbytes]
                                       .view("<f4")).view(count, *p.info.shape) for p in layout.parts]
        else:
            values = self._scratch(tuple((count, *shapes[n]) for n in names))
        forms = {n: f for n, f in (scaled or {}).items() if n in shapes and len(shapes[n]) == 2}
        fill({n: v for n, v in zip(names, values) if n not in forms})
        limit = math.inf
        if bounds is not None and count and len(bounds) == count and bool(np.isfinite(bounds).all()):
            limit = float(bounds.max())
        return self._seal(buf, layout, self._convert(buf, layout, names, values, in_place=True, bound=limit,
                                                     forms=forms))

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
        if batch * sum(4 * t[0].numel() for t in values) > BATCH_BUFFER_BYTES:
            return [self.write({n: t[i] for n, t in zip(names, values)}) for i in range(batch)]
        layout = self._layout({n: tuple(v.shape[1:]) for n, v in zip(names, values)})
        buf = np.empty((batch, layout.size), np.uint8)
        return self._seal(buf, layout, self._convert(buf, layout, names, values))

    def frame_memory(self, shapes: Mapping[str, tuple[int, ...]], scaled: Collection[str] = ()) -> int:
        """Bytes :meth:`write_into` holds per frame of tensors ``{name: shape}``: the frame itself,
        plus the float32 scratch of the tensors it converts (none in fp32, where they are computed in
        the frame; none for the ``scaled`` ones, which the kernels write in their encoding)."""
        layout = self._layout(shapes)
        if layout.direct:
            return layout.size
        return layout.size + 4 * sum(math.prod(s) for name, s in shapes.items() if name not in scaled)

    def _layout(self, shapes: Mapping[str, tuple[int, ...]]) -> _Layout:
        """The frame layout of one sample's tensors ``{name: shape}`` (cached by :func:`_layout`)."""
        return _layout(self.encoding, tuple(shapes.items()), self.model_id, self.model_version, self.checksum)

    def _scratch(self, shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
        """Float32 tensors of ``shapes``: views of this thread's one scratch buffer (grown when too
        small), made once per shapes."""
        local = self._local
        sizes = [math.prod(s) for s in shapes]
        if getattr(local, "buffer", None) is None or local.buffer.numel() < sum(sizes):
            local.buffer, local.views = torch.empty(sum(sizes)), {}
        found = local.views.get(shapes)
        if found is None:
            if len(local.views) >= _SCRATCH_SHAPES:
                local.views.clear()
            parts = local.buffer[:sum(sizes)].split(sizes)
            found = local.views[shapes] = [t.view(s) for t, s in zip(parts, shapes)]
        return found

    def _convert(self, buf: np.ndarray, layout: _Layout, names: list[str], values: list[torch.Tensor],
                 in_place: bool = False, bound: float = math.inf,
                 forms: Mapping[str, ScaledBase] | None = None) -> list[str | None]:
        """Write ``[B, *shape]`` tensors into the payloads of ``buf`` (one op per tensor); returns why
        each sample cannot be sent (``None``: it can). ``in_place``: the tensors are scratch, or
        already the frame's payload (:meth:`write_into`). ``bound``: no |value| exceeds it (so
        a finite bound leaves nothing for the fp32 check to find, one under 65504 nothing for fp16's).
        ``forms``: tensors not computed yet, written here by the kernels (see :meth:`write_into`)."""
        batch = buf.shape[0]
        why: list[str | None] = [None] * batch
        forms = forms or {}
        for part in layout.parts:
            x, name, info = values[part.source], names[part.source], part.info
            dst = buf[:, layout.start + part.offset:layout.start + part.offset + info.nbytes]
            form = forms.get(name) if part.kind != "scale" else None
            written = form is not None and _write_form(form, part, buf, layout.start + part.offset, x, bound)
            if isinstance(written, np.ndarray):  # the int8 rows, quantised by the kernel, and their scales
                scale = written
                continue
            if part.kind == "int8":
                shape = (batch, math.prod(info.shape[:-1]), info.shape[-1])
                scale = _quantise(x.reshape(shape), dst.reshape(shape).view(np.int8), scratch=in_place)
            elif part.kind == "scale":
                dst.view("<f4")[...] = scale.reshape(batch, -1)
                # Per-call costs dominate at small batches: look for bad rows only when there are any.
                if not np.isfinite(scale).all():
                    for i in np.flatnonzero(~np.isfinite(scale).all(axis=1)):
                        why[i] = why[i] or _NAN_OR_INF.format(name)
                continue
            elif x.numel() and info.dtype == "f16":
                flat = x.reshape(batch, -1)
                half = dst.view("<f2")
                if not written:
                    torch.from_numpy(half).copy_(flat)  # PyTorch converts with the CPU's F16C instructions
                if bound < FP16_MAX:
                    continue
                suspects = _fp16_suspects(half.view(np.int16))
                if suspects.any():
                    for i in np.flatnonzero(suspects):
                        why[i] = why[i] or _fp16_refusal(flat[i], name)
            elif x.numel():
                flat = x.reshape(batch, -1)
                finite = np.ones(batch, bool) if bound < math.inf else _finite_rows(flat)
                if not finite.all():
                    for i in np.flatnonzero(~finite):
                        why[i] = why[i] or _NAN_OR_INF.format(name)
                if batch == 1 and why[0] is not None:
                    break
                if not (in_place and layout.direct):
                    dst.view("<f4")[...] = flat.numpy()
        return why

    def _seal(self, buf: np.ndarray, layout: _Layout, why: list[str | None]) -> list[memoryview | ValueError]:
        """Header, payload checksum and header CRC of each frame in ``buf`` whose payload was written."""
        out: list[memoryview | ValueError] = []
        view = memoryview(buf.reshape(-1))
        for i, reason in enumerate(why):
            if reason is not None:
                out.append(ValueError(reason))
                continue
            frame = view[i * layout.size:(i + 1) * layout.size]
            digest = payload_checksum(self.checksum, frame[layout.start:]).encode("ascii")
            frame[PREFIX_BYTES:layout.start] = layout.template
            frame[layout.digest_at:layout.digest_at + len(digest)] = digest
            _PREFIX.pack_into(frame, 0, MAGIC, PROTOCOL_VERSION, len(layout.template),
                              zlib.crc32(frame[PREFIX_BYTES:layout.start]))
            out.append(frame)
        return out


def encode_batch(tensors: Mapping[str, torch.Tensor | np.ndarray], encoding: str, model_id: str,
                 model_version: str, checksum: str = DEFAULT_CHECKSUM) -> list[memoryview | ValueError]:
    """One frame per sample of batched tensors ``{name: [B, *shape]}``, equal to :func:`encode` of each.

    A sample that cannot be sent (NaN/Inf, beyond the fp16 range) gets its ``ValueError`` in
    its place instead of failing the others. Each frame is a view of its own buffer.
    """
    return FrameWriter(encoding, model_id, model_version, checksum).write_batch(tensors)


def encode_view(tensors: Mapping[str, torch.Tensor | np.ndarray], encoding: str, model_id: str,
                model_version: str, checksum: str = DEFAULT_CHECKSUM) -> memoryview:
    """:func:`encode` without the final copy: the frame as a view of the buffer it was built in."""
    frame = FrameWriter(encoding, model_id, model_version, checksum).write(tensors)
    if isinstance(frame, ValueError):
        raise frame
    return frame


def encode(tensors: Mapping[str, torch.Tensor | np.ndarray], encoding: str, model_id: str,
           model_version: str, checksum: str = DEFAULT_CHECKSUM) -> bytes:
    """Serialize ``tensors`` (float, any shapes) as one frame in ``encoding``.

    For ``fp32``/``fp16``/``int8`` the tensors are Θ_d (``weight``, ``bias``); for
    ``factors`` the generator's factors; for ``driver`` ``{"driver": d}``. The
    latter two always travel as fp32. ``checksum`` names the payload checksum
    (:data:`~stablesynth_device.wire.protocol.CHECKSUMS`).
    """
    return bytes(encode_view(tensors, encoding, model_id, model_version, checksum))
