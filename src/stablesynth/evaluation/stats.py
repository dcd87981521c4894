"""Intervals for the claims the report makes: paired per-device differences, bootstrapped over devices.

A claim "A beats B" is made only when the 95 % interval of the mean per-device
difference excludes zero; otherwise the report says "tie". Devices are the unit that is
resampled (clips of one device share a camera and a usage skew, so they are not
independent), and the two methods are compared on the same devices (paired).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

#: Bootstrap resamples and the interval's coverage used everywhere a claim is made.
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


def bootstrap_mean_ci(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` and its percentile-bootstrap interval: ``{"mean", "low", "high", "n"}``.

    With fewer than two values the interval is the mean itself (nothing to resample).
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean": mean, "low": float(low), "high": float(high), "n": n}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], devices: Sequence[str] | None = None,
                      **kwargs: Any) -> dict[str, float]:
    """Mean per-device difference a − b over the devices both have (or ``devices``), with its interval."""
    keys = [k for k in (devices if devices is not None else a) if k in a and k in b]
    return bootstrap_mean_ci([a[k] - b[k] for k in keys], **kwargs)


def wilson_interval(hits: int, n: int, confidence: float = CONFIDENCE) -> dict[str, float]:
    """A proportion ``hits / n`` with its Wilson score interval: ``{"mean", "low", "high", "n"}``.

    For one device's accuracy over its few clips, where a bootstrap over clips is too coarse.
    """
    if n <= 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n hits the bound on that side is exactly 0 or 1 (the formula leaves rounding dust).
    low = 0.0 if hits == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if hits == n else max(p, min(1.0, centre + half))
    return {"mean": p, "low": low, "high": high, "n": n}


def verdict(ci: Mapping[str, float]) -> str:
    """"beats", "loses to" or "ties with", from whether the interval excludes zero."""
    if not ci["n"] or not math.isfinite(ci["low"]):
        return "ties with"
    if ci["low"] > 0:
        return "beats"
    if ci["high"] < 0:
        return "loses to"
    return "ties with"


def format_ci(ci: Mapping[str, float], scale: float = 100.0) -> str:
    """``+1.2 [−0.3, +2.6]`` in points (accuracy fractions × 100)."""
    return f"{scale * ci['mean']:+.1f} [{scale * ci['low']:+.1f}, {scale * ci['high']:+.1f}]"
