"""`bench ablate`: variants over seeds, each with its interval and its paired difference to the defaults."""

import json

import pytest

from stablesynth.bench.ablate import run_ablation, variants
from stablesynth.experiment.demo import load_run_config


def test_variants_cover_modules_stage2_frames_and_the_encoder():
    groups = {v.group for v in variants(5)}
    assert {"reference", "modules", "templates", "generator", "stage2", "frames", "encoder"} <= groups
    assert [v.frames for v in variants(5) if v.group == "frames"] == [1, 2, 3, 4, 5]
    # The packaged camera and aux profiles are the mild profile with the encoder variant's change.
    mild, quick = load_run_config("mild"), load_run_config(quick=True)
    camera, aux = (v for v in variants(5) if v.group == "encoder")
    assert camera.run_config(mild) == load_run_config("camera").replace(method_overrides=mild.method_overrides)
    assert camera.run_config(quick) is None  # no stage 0 to change: the variant is left out
    assert aux.run_config(mild) == load_run_config("aux")
    assert all(v.slug for v in variants(5) if v.run) and all(not v.run for v in variants(5) if v.group != "encoder")


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


@pytest.mark.slow
def test_encoder_variants_train_their_own_stage1_and_are_paired_with_the_defaults(tmp_path):
    cfg = load_run_config(quick=True)
    cfg = cfg.replace(stage0={"epochs": 1, "limit_questions": 400, "evaluate": False})
    ab = run_ablation(cfg, tmp_path / "run", seeds=1, only=["reference", "encoder"], log=lambda _: None)
    names = [r["name"] for r in ab["rows"]]
    assert names[-2:] == ["stage 0 sees camera-like captures", "stage 1 colour and shape heads"]
    for r in ab["rows"][-2:]:
        assert r["vs_reference"]["n"] == 5 and "vs_reference" in r["session"]
    assert {p.name for p in (tmp_path / "run" / "ablate").iterdir()} == {"stage0-camera", "stage1-aux"}
    assert len(list((tmp_path / "stage0-cache").iterdir())) == 2  # the default's stage 0 and the camera one
