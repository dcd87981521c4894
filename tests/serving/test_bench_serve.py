"""The serving benchmark end to end: a real server subprocess on loopback, every row measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from stablesynth.bench.serve import run_serve_benchmark


@pytest.mark.slow
def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    res = run_serve_benchmark(None, tmp_path, requests=20, concurrency=[1, 4], time_cap_s=10.0)
    names = {(r["name"], r["concurrency"]) for r in res["rows"]}
    assert {("noop", 1), ("adapt", 4), ("adapt-factors", 1), ("duet-full", 4), ("in-process", 1)} <= names
    assert all(r["errors"] == 0 and r["ok"] > 0 for r in res["rows"])
    full = next(r for r in res["rows"] if r["name"] == "duet-full")
    assert 97 * 1501 * 4 < full["reply_bytes"] < 97 * 1501 * 4 + 512
    assert (tmp_path / "serve.json").is_file() and "1" in res["ratios"]
