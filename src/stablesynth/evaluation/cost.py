"""Cost accounting: FLOPs, parameters, payload bytes, transfer time and measured latency.

Units follow the paper's Table 5: a KB is 1024 bytes and an MB/s is 1024 KB/s, so
568.5 KB at 100 MB/s takes 5.55 ms.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: Bytes per number of each payload encoding (int8 adds one fp32 scale per row).
BYTES_PER_NUMBER = {"fp32": 4, "fp16": 2, "int8": 1}
SCALE_BYTES = 4


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` as counted by ``torch.utils.flop_counter``.

    A multiply-add counts as 2 FLOPs (``Linear(96, n)`` on one vector is 2·96·n); the
    counter sees matmuls, convolutions and attention, not elementwise operations.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); only those with ``requires_grad`` if asked."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def payload_bytes(numel: int, encoding: str, rows: int | None = None) -> int:
    """Bytes of ``numel`` numbers in ``encoding``.

    int8 adds one fp32 scale per row (a single scale when ``rows`` is None).
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if encoding not in BYTES_PER_NUMBER:
        raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(BYTES_PER_NUMBER)})")
    size = numel * BYTES_PER_NUMBER[encoding]
    if encoding == "int8":
        n_rows = 1 if rows is None else rows
        if n_rows < 1:
            raise ValueError(f"rows must be >= 1 for int8, got {rows}")
        size += n_rows * SCALE_BYTES
    return size


def kb(nbytes: float) -> float:
    """Bytes → KB (1024 B), the paper's unit."""
    return nbytes / 1024.0


def transfer_ms(nbytes: float, mb_per_s: float) -> float:
    """Time to move ``nbytes`` at ``mb_per_s`` (MB = 1024·1024 B), in milliseconds."""
    if mb_per_s <= 0:
        raise ValueError(f"bandwidth must be > 0 MB/s, got {mb_per_s}")
    return nbytes / (mb_per_s * 1024.0 * 1024.0) * 1000.0


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) of already sorted values."""
    # Linear interpolation between order statistics (numpy's default), without numpy.
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_call(fn: Callable[[], Any], repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """Wall-clock latency of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    Returns ``median_ms``, ``p90_ms``, ``mean_ms``, ``min_ms``, ``max_ms`` and ``repeats``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e6)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": percentile(times, 0.9),
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "max_ms": times[-1],
        "repeats": float(repeats),
    }
