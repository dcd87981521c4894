"""`bench tune` scores candidates on validation clips only."""

import json

import pytest

from stablesynth.bench import tune
from stablesynth.config import ConfigError
from stablesynth.experiment.demo import load_run_config


def test_candidates_cover_the_grid():
    got = tune.candidates({"lr": [1, 2], "epochs": [3]})
    assert got == [{"epochs": 3, "lr": 1}, {"epochs": 3, "lr": 2}]


def test_tuning_needs_validation_clips(tmp_path):
    cfg = load_run_config(quick=True)
    cfg = cfg.replace(benchmark=cfg.benchmark.replace(validation_per_device=0))
    with pytest.raises(ValueError, match="validation_per_device"):
        tune.run_tuning(cfg, tmp_path)
    with pytest.raises(ConfigError, match="validation_per_device"):
        cfg.benchmark.replace(validation_per_device=cfg.benchmark.history_per_device)


@pytest.mark.slow
def test_tuning_chooses_on_validation_and_records_every_candidate(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "GRIDS", {"f_hyper": {"lr": [1e-4, 1e-3], "epochs": [1]}})
    report = tune.run_tuning(load_run_config(quick=True), tmp_path, log=lambda _: None)
    rows = report["methods"]["f_hyper"]["candidates"]
    assert len(rows) == 2 and all(r["validation"]["n"] == 3 for r in rows)  # the 3 seen devices
    best = max(rows, key=lambda r: r["validation"]["mean"])
    assert report["methods"]["f_hyper"]["chosen"] == best["overrides"]
    assert json.loads((tmp_path / "tune.json").read_text())["methods"]["f_hyper"]["chosen"] == best["overrides"]
