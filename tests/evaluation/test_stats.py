"""The intervals behind every claim in report.md."""

from __future__ import annotations

import math

import pytest

from stablesynth.evaluation.stats import bootstrap_mean_ci, paired_difference, verdict, wilson_interval


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_devices() -> None:
    few = bootstrap_mean_ci([0.1, -0.2, 0.3, 0.0])
    many = bootstrap_mean_ci([0.1, -0.2, 0.3, 0.0] * 25)
    assert few["low"] <= few["mean"] <= few["high"] and few["n"] == 4
    assert many["mean"] == pytest.approx(few["mean"])
    assert many["high"] - many["low"] < few["high"] - few["low"]
    assert bootstrap_mean_ci([0.4])["low"] == 0.4 and math.isnan(bootstrap_mean_ci([])["mean"])


def test_paired_difference_gives_a_verdict_only_when_the_interval_excludes_zero() -> None:
    a = {str(d): 0.9 for d in range(10)}
    better = {str(d): 0.8 + 0.01 * (d % 3) for d in range(10)}
    mixed = {str(d): 0.9 + (0.05 if d % 2 else -0.05) for d in range(10)}
    assert verdict(paired_difference(a, better)) == "beats"
    assert verdict(paired_difference(better, a)) == "loses to"
    assert verdict(paired_difference(a, mixed)) == "ties with"


def test_wilson_interval_matches_the_closed_form() -> None:
    # 12 of 15 at 95 %: (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964.
    ci = wilson_interval(12, 15)
    assert ci["mean"] == pytest.approx(0.8)
    assert ci["low"] == pytest.approx(0.548146, abs=1e-6) and ci["high"] == pytest.approx(0.929525, abs=1e-6)
    # Symmetric in hits and misses, inside [0, 1] at the ends, and undefined with no trials.
    assert wilson_interval(3, 15)["low"] == pytest.approx(1 - ci["high"])
    assert wilson_interval(0, 10)["low"] == 0.0 and wilson_interval(10, 10)["high"] == 1.0
    assert wilson_interval(10, 10)["low"] < 1.0
    for n in (1, 3, 7, 19):  # the interval always holds the observed proportion, exactly at 0 and n
        for k in range(n + 1):
            ci = wilson_interval(k, n)
            assert ci["low"] <= ci["mean"] <= ci["high"]
    assert math.isnan(wilson_interval(0, 0)["mean"])
