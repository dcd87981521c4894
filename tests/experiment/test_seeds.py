"""`demo --seeds N`: every figure as a spread over seeds, the caption tasks too, and bad counts refused."""

import pytest

from stablesynth.cli import main
from stablesynth.evaluation.report import render_seeds
from stablesynth.experiment.seeds import summarise_seeds


def _methods(offset: float) -> dict:
    def entry(label: str, acc: float, proposed: bool = False) -> dict:
        per_device = {"0": acc, "1": acc + 0.02, "2": acc - 0.04, "3": acc - 0.02}
        return {"label": label, "proposed": proposed, "accuracy": {"per_sample": {
            "per_device": per_device, "seen": {"mean": acc + 0.01}, "unseen": {"mean": acc - 0.03}}}}

    return {"fine_tune": entry("Fine-tuning", 0.80 + offset),
            "stablesynth": entry("StableSynthNet", 0.85 + offset, True)}


def _run(seed: int, offset: float) -> dict:
    return {
        "config": {"benchmark": {"seed": seed}},
        "benchmark": {"devices": [{"id": 0, "seen": True}, {"id": 1, "seen": True}, {"id": 2, "seen": False},
                                  {"id": 3, "seen": False}]},
        "methods": _methods(offset),
        "informative": {"global_clean": 0.97, "global_seen": 0.81 + offset, "global_unseen": 0.70 + offset,
                        "oracle_seen": 0.9, "oracle_unseen": 0.9},
        "diagnostics": {"global_unseen": 0.70 + offset, "prior_corrected_unseen": 0.75 + offset},
        "tasks": {"mc": {"methods": _methods(2 * offset)}},
    }


def test_seed_summary_gives_spreads_headroom_and_the_caption_tasks():
    runs = [_run(0, 0.0), _run(1, 0.02), _run(2, -0.04)]
    s = summarise_seeds(runs)
    assert s["n_seeds"] == 3 and s["seeds"] == [0, 1, 2] and s["proposed"] == "stablesynth"
    ft = s["methods"]["fine_tune"]["seen"]
    assert ft["per_seed"] == pytest.approx([0.81, 0.83, 0.77])
    assert (ft["min"], ft["max"]) == (pytest.approx(0.77), pytest.approx(0.83))
    # StableSynthNet is 5 points ahead on every device of every seed.
    assert s["methods"]["fine_tune"]["unseen"]["proposed_minus_this"]["mean"] == pytest.approx(0.05)
    assert "proposed_minus_this" not in s["methods"]["stablesynth"]["seen"]
    h = s["headroom"]
    assert h["oracle_minus_global_unseen"]["per_seed"] == pytest.approx([0.2, 0.18, 0.24])
    assert h["prior_gain_unseen"]["per_seed"] == pytest.approx([0.05, 0.05, 0.05])
    assert h["prior_share_unseen"] == pytest.approx(0.05 / 0.2067, rel=1e-3)
    mc = s["tasks"]["mc"]["methods"]["fine_tune"]["seen"]
    assert (mc["min"], mc["max"]) == (pytest.approx(0.73), pytest.approx(0.85))
    text = "\n".join(render_seeds(s))
    assert "Multiple choice" in text and "(min–max" in text and "oracle − global head" in text
    assert "| Fine-tuning | 80.3 (77.0–83.0) |" in text


@pytest.mark.parametrize("argv, flag", [(["--seeds", "0"], "--seeds"), (["--seeds", "x"], "--seeds"),
                                        (["--seed", "-3"], "--seed")])
def test_bad_seed_counts_are_refused_before_anything_is_written(tmp_path, capsys, argv, flag):
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
