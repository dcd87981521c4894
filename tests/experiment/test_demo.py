"""The quick demo end to end: results.json follows the schema, the report is made from it alone."""

import json
from pathlib import Path

import pytest

from stablesynth.cli import main
from stablesynth.config import ConfigError
from stablesynth.evaluation.report import render_report
from stablesynth.evaluation.schema import ResultsSchemaError, load_results, validate_results
from stablesynth.experiment.demo import RunConfig, load_run_config
from stablesynth.methods import METHODS


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_demo_writes_valid_results_and_plots(quick_run: Path):
    results = load_results(quick_run / "results.json")
    assert set(results["methods"]) == set(METHODS.names())
    for name in ("report.md", "per_device_accuracy.png", "accuracy_vs_cost.png", "devices.png"):
        assert (quick_run / name).stat().st_size > 0
    ours = results["methods"]["stablesynth"]
    assert ours["bytes"]["up"] == 192 * 4
    assert ours["bytes"]["down"]["fp32"] == 97 * 13 * 4
    assert ours["flops"]["paper_K"] == 1501 and ours["flops"]["paper"] > ours["flops"]["benchmark"] > 0
    duet = results["methods"]["duet"]
    assert duet["bytes"]["up"] == 5 * 192 * 4
    assert duet["flops"]["paper"] > 27_000_000  # DUET's full generator at K = 1501
    assert results["oracle"]["finetune_seconds"]["median"] > 0
    enc = ours["encodings"]
    assert enc["fp32"]["delta_points"] == 0.0
    # Lossless encodings give exactly fp32's predictions; the compact ones are smaller on the wire.
    assert enc["factors"]["accuracy"] == enc["fp32"]["accuracy"] == enc["driver"]["accuracy"]
    assert enc["driver"]["bytes"] < enc["factors"]["bytes"] < enc["fp32"]["bytes"]
    assert enc["int8"]["bytes"] < enc["fp16"]["bytes"] < enc["fp32"]["bytes"]
    by_type = results["informative"]["by_question_type"]
    assert set(by_type) <= {"shape", "color", "yes_no_shape", "yes_no_color"} and by_type
    assert all(q["worst"] <= q["mean"] + 1e-9 for q in by_type.values())
    assert all(q["worst_low"] <= q["worst"] <= q["worst_high"] and q["worst_n"] >= 1 for q in by_type.values())
    assert all(q["clearly_below_goal"] <= q["below_goal"] <= q["devices"] for q in by_type.values())
    probe = results["informative"]["shape_probe"]  # 6 fresh shape questions per device (quick config)
    assert probe["per_device"] == 6 and probe["devices"] == 5 and probe["question_type"] == "shape"
    assert probe["clearly_below_goal"] + probe["clearly_above_goal"] <= probe["devices"]
    assert probe["worst_n"] == 6 and probe["worst_low"] <= probe["worst"] <= probe["mean"] + 1e-9
    diag = results["diagnostics"]
    assert 0.0 <= diag["device_probe_accuracy"] <= 1.0 and diag["chance"] == pytest.approx(1 / 3)


def test_report_is_rendered_from_results_json_alone(quick_run: Path):
    results = json.loads((quick_run / "results.json").read_text())
    assert (quick_run / "report.md").read_text() == render_report(results)
    # A figure changed in results.json shows up in the report: nothing is typed in by hand.
    results["methods"]["stablesynth"]["accuracy"]["per_sample"]["seen"]["mean"] = 0.4321
    assert "43.2" in render_report(results)


def test_second_run_reuses_finished_stages(quick_run: Path, capsys):
    assert main(["demo", "--quick", "--out", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert "reusing finished checkpoint" in out
    assert out.count("stage 2") >= 1 and "reusing" in out


def test_results_schema_rejects_missing_and_wrong_fields(quick_run: Path):
    results = json.loads((quick_run / "results.json").read_text())
    del results["methods"]["duet"]["flops"]
    with pytest.raises(ResultsSchemaError, match=r"methods\.duet\.flops"):
        validate_results(results)
    results = json.loads((quick_run / "results.json").read_text())
    results["methods"]["duet"]["accuracy"]["per_sample"]["per_device"]["0"] = 1.5
    with pytest.raises(ResultsSchemaError, match="fraction"):
        validate_results(results)


@pytest.mark.parametrize("name", ["demo", "mild", "scratch", "harsh", "camera", "aux", "quick"])
def test_every_packaged_run_config_loads(name: str):
    cfg = load_run_config(name)  # checked on load: keys, ranges, the encoder's input size
    assert cfg.methods and (cfg.stage0 is None) == (name in ("scratch", "quick"))


def test_camera_config_is_the_mild_profile_with_camera_augmented_pretraining():
    demo, camera = load_run_config("mild").to_dict(), load_run_config("camera").to_dict()
    assert camera["stage0"]["augment"] == "camera" and demo["stage0"]["augment"] == "none"
    for key in set(demo) - {"stage0", "method_overrides"}:
        assert camera[key] == demo[key], key
    assert {k: v for k, v in camera["stage0"].items() if k != "augment"} == \
        {k: v for k, v in demo["stage0"].items() if k != "augment"}


def test_aux_config_is_the_mild_profile_with_stage1_attribute_losses():
    demo, aux = load_run_config("mild").to_dict(), load_run_config("aux").to_dict()
    assert aux["stage1"]["aux_weight"] > 0 and demo["stage1"]["aux_weight"] == 0
    assert {k: v for k, v in aux["stage1"].items() if k != "aux_weight"} == \
        {k: v for k, v in demo["stage1"].items() if k != "aux_weight"}
    for key in set(demo) - {"stage1"}:
        assert aux[key] == demo[key], key


def test_run_config_errors_name_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"stage1\.epochz"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="methods"):
        RunConfig.from_dict({"methods": ["nope"]})
    with pytest.raises(ConfigError, match=r"benchmark\.image_size"):
        RunConfig.from_dict({"benchmark": {"image_size": 48}})
    with pytest.raises(ConfigError, match=r"method_overrides\.stablesynth"):
        RunConfig.from_dict({"method_overrides": {"stablesynth": {"lambda_f": 3.0}}})


def test_cli_reports_bad_config_without_traceback(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder: no-such-encoder\n")
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown encoder preset" in capsys.readouterr().err


@pytest.mark.slow
def test_stage0_is_pretrained_once_and_shared_by_later_runs(tmp_path: Path, capsys):
    cfg = load_run_config(quick=True).to_dict()
    cfg["stage0"] = {"epochs": 1, "limit_questions": 400, "evaluate": False}
    cfg["methods"] = ["f_linear", "fine_tune"]
    path = tmp_path / "s0.json"
    path.write_text(json.dumps(cfg))
    assert main(["demo", "--config", str(path), "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    results = load_results(tmp_path / "a" / "results.json")
    assert results["stage0"]["checkpoint"] and "Stage 0" in (tmp_path / "a" / "report.md").read_text()
    assert (tmp_path / "stage0-cache" / results["stage0"]["checkpoint"]).is_dir()
    # Another run (another folder, another seed) beside it reuses the cached stage 0.
    assert main(["demo", "--config", str(path), "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert "stage 0: reusing" in capsys.readouterr().out and "stage 0: reusing" not in first
