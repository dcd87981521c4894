"""`bench ablate`: variants over seeds, each with its interval and its paired difference to the defaults."""

import json

import pytest

from stablesynth.bench.ablate import run_ablation, variants
from stablesynth.experiment.demo import load_run_config


def test_variants_cover_modules_stage2_and_frames():
    groups = {v.group for v in variants(5)}
    assert {"reference", "modules", "templates", "generator", "stage2", "frames"} <= groups
    assert [v.frames for v in variants(5) if v.group == "frames"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_ablation_rows_carry_intervals_against_the_defaults(tmp_path):
    ab = run_ablation(load_run_config(quick=True), tmp_path, seeds=2, only=["reference", "modules"],
                      log=lambda _: None)
    rows = ab["rows"]
    assert rows[0]["name"] == "StableSynthNet (defaults)" and len(rows[0]["per_seed"]) == 2
    for r in rows:
        assert r["ci"]["low"] <= r["mean"] <= r["ci"]["high"] and r["ci"]["n"] == 5  # the quick run's 5 devices
    assert all("vs_reference" in r for r in rows[1:]) and "vs_reference" not in rows[0]
    for r in rows:  # per session too: one upload at each session's start
        s = r["session"]
        assert s["ci"]["low"] <= s["mean"] <= s["ci"]["high"] and len(s["per_device"]) == 5
    assert all("vs_reference" in r["session"] for r in rows[1:])
    assert "per session" in ab["notes"][1]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["n_seeds"] == 2 and (tmp_path / "ablation.png").stat().st_size > 0
