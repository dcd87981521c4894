"""Native kernels of the reply path: a scaled base straight into a frame's payload, in one pass.

FiLM's Θ_d weight is ``base ⊙ row colᵀ`` (:meth:`~stablesynth.models.generators.Generator.scaled_bases`).
Computed in PyTorch and then encoded, a 582 KB weight at K = 1501 takes two passes to expand and
one to five more to convert (fp16) or quantise (int8), each a trip through memory. These kernels
(compiled by numba, cached on disk) compute each value as ``(base[i, j] · row[i]) · col[j]`` in
float32, exactly as :meth:`FiLMGenerator.expand` does, and write it in the encoding at once:

- fp32: the product (the same bits as PyTorch's two multiplications);
- fp16: a row of ``c`` products computed into a small buffer, then rounded to half precision by
  the CPU's conversion instruction (``fptrunc``, F16C on x86), as PyTorch converts, so the bits
  are the same (the two loops vectorise; one loop doing both does not);
- int8: the row's largest magnitude found as the largest integer of the values' bit patterns
  with the sign bit cleared (an integer maximum, which vectorises; for finite values their order
  is that of the magnitudes), then scaled and rounded half to even. A row whose scale is not
  usual (tiny, or not finite) is left to the caller, which then quantises the group as before.

Measured in process, one thread, K = 1501, H = 96 (µs per upload, this kernel against the PyTorch
passes it replaces): fp32 27 against 48, fp16 32 against 76, int8 55 against about 160.
"""

from __future__ import annotations

import logging

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Below this scale an int8 row is left to the caller, which quantises it the way it always does.
from stablesynth.cloud.framing import TINY_SCALE

_127 = np.float32(127)
_ONE = np.float32(1)
_INF = np.float32(np.inf)


@intrinsic
def _half_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The IEEE half-precision bits of a float32, rounded to nearest even (vcvtps2ph with F16C)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _magnitude_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """A float32's bit pattern without its sign, as an int32: ordered as the magnitudes are."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.and_(bits, ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _round_int8(typingctx, x):  # type: ignore[no-untyped-def]
    """Round half to even, to int8 (the caller keeps |x| <= 127.5)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        rint = builder.module.declare_intrinsic("llvm.rint", [ir.FloatType()])
        return builder.fptosi(builder.call(rint, [args[0]]), ir.IntType(8))

    return types.int8(types.float32), codegen


@njit(inline="always", boundscheck=False)
def _scaled_row(base: np.ndarray, i: int, g: np.float32, col: np.ndarray, out: np.ndarray) -> None:
    """``out`` ← row ``i`` of ``base ⊙ g colᵀ``, each value ``(base[i, j] · g) · col[j]`` in float32."""
    for j in range(out.shape[0]):
        out[j] = (base[i, j] * g) * col[j]


@njit(cache=True, boundscheck=False, nogil=True)
def scaled_fp32(base: np.ndarray, row: np.ndarray, col: np.ndarray, buf: np.ndarray, start: int) -> None:
    """``buf[s, start:]`` as float32 ← ``(base · row[s, :, None]) · col[s, None, :]`` for each sample ``s``."""
    r_dim, c_dim = base.shape
    for s in range(row.shape[0]):
        out = buf[s, start:start + 4 * r_dim * c_dim].view(np.float32)
        for i in range(r_dim):
            _scaled_row(base, i, row[s, i], col[s], out[i * c_dim:(i + 1) * c_dim])


@njit(cache=True, boundscheck=False, nogil=True)
def scaled_fp16(base: np.ndarray, row: np.ndarray, col: np.ndarray, buf: np.ndarray, start: int) -> None:
    """:func:`scaled_fp32`, each value rounded to fp16 (its bits as uint16)."""
    r_dim, c_dim = base.shape
    tmp = np.empty(c_dim, np.float32)
    for s in range(row.shape[0]):
        out = buf[s, start:start + 2 * r_dim * c_dim].view(np.uint16)
        for i in range(r_dim):
            _scaled_row(base, i, row[s, i], col[s], tmp)
            seg = out[i * c_dim:(i + 1) * c_dim]
            for j in range(c_dim):
                seg[j] = _half_bits(tmp[j])


@njit(cache=True, boundscheck=False, nogil=True)
def scaled_int8(base: np.ndarray, row: np.ndarray, col: np.ndarray, buf: np.ndarray, start: int,
                scales: np.ndarray) -> bool:
    """:func:`scaled_fp32` quantised per row (symmetric int8, ``scales[s, i]`` = max|row| / 127);
    False when some row's scale is under :data:`TINY_SCALE` or not finite (its bytes are then not
    written: the caller quantises the samples again its own way)."""
    r_dim, c_dim = base.shape
    tmp = np.empty(c_dim, np.float32)
    usual = True
    for s in range(row.shape[0]):
        out = buf[s, start:start + r_dim * c_dim].view(np.int8)
        for i in range(r_dim):
            _scaled_row(base, i, row[s, i], col[s], tmp)
            top = np.int32(0)
            for j in range(c_dim):
                top = max(top, _magnitude_bits(tmp[j]))
            scale = _bits_float(top) / _127
            scales[s, i] = scale
            if not (scale >= TINY_SCALE and scale < _INF):  # also NaN, whose bits are above +Inf's
                usual = False
                continue
            factor = _ONE / scale
            seg = out[i * c_dim:(i + 1) * c_dim]
            for j in range(c_dim):
                seg[j] = _round_int8(tmp[j] * factor)
    return usual


def usable() -> bool:
    """Compile (or load) every kernel and check it on a tiny input; False where that fails (e.g. a
    CPU whose half-precision conversion LLVM cannot emit), so callers keep to PyTorch."""
    base = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    row, col = np.ones((1, 2), np.float32), np.full((1, 3), 0.5, np.float32)
    want = (base * row[0, :, None]) * col[0]
    try:
        buf = np.zeros((1, 24), np.uint8)
        scaled_fp32(base, row, col, buf, 0)
        ok = np.array_equal(buf[0].view(np.float32).reshape(2, 3), want)
        scaled_fp16(base, row, col, buf, 0)
        ok &= np.array_equal(buf[0, :12].view(np.float16).reshape(2, 3), want.astype(np.float16))
        scales = np.zeros((1, 2), np.float32)
        ok &= bool(scaled_int8(base, row, col, buf, 0, scales)) and bool(np.all(scales > 0))
    except Exception as exc:  # a compile or link error: numba raises many kinds
        logging.getLogger(__name__).warning("reply-path kernels unavailable, using PyTorch: %s", exc)
        return False
    return bool(ok)
