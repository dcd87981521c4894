"""The serving benchmark end to end: a real server subprocess on loopback, every row measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from stablesynth.bench.serve import format_table, run_serve_benchmark


@pytest.mark.slow
def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    res = run_serve_benchmark(None, tmp_path, requests=30, concurrency=[1, 4], time_cap_s=10.0, clients=2)
    names = {(r["name"], r["concurrency"]) for r in res["rows"]}
    assert {("noop", 1), ("adapt", 4), ("adapt-fp32", 1), ("duet-full", 4), ("in-process", 1), ("v2-binary", 1),
            ("v2-json", 4)} <= names
    assert all(r["errors"] == 0 and r["ok"] > 0 for r in res["rows"])
    by = {(r["name"], r["concurrency"]): r for r in res["rows"]}
    # The primary row carries the generator's factors; the fp32 rows carry Θ_d (97·K floats + header).
    assert by[("adapt", 1)]["reply_bytes"] < 20_000
    for name in ("adapt-fp32", "duet-full", "noop-fp32", "v2-binary"):
        assert 97 * 1501 * 4 < by[(name, 4)]["reply_bytes"] < 97 * 1501 * 4 + 512
    assert all(r["server_cpu"] is not None and r["server_us_per_req"] >= 0 for r in res["rows"]
               if r["name"] != "in-process")
    assert (tmp_path / "serve.json").is_file() and "1" in res["ratios"]
    goals = {(v["goal"], v["row"]) for v in res["verdicts"]}
    assert len(goals) == 11 and ("zero errors", "all") in goals
    table = format_table(res)
    assert table.count("MET") >= 11 and "[adapt]" in table and "[adapt-int8]" in table and "[v2-binary]" in table
