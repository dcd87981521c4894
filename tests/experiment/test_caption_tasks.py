"""`stablesynth demo --task mc|ret|all`: multiple choice and retrieval on the clips' captions, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stablesynth.cli import main
from stablesynth.evaluation.report import render_report
from stablesynth.evaluation.schema import ResultsSchemaError, load_results, validate_results


@pytest.fixture(scope="module")
def all_tasks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    assert main(["demo", "--quick", "--task", "all", "--out", str(out)]) == 0
    return out


def test_all_writes_every_task_into_one_report(all_tasks: Path):
    results = load_results(all_tasks / "results.json")
    assert results["config"]["tasks"] == ["qa", "mc", "ret"] and "stablesynth" in results["methods"]
    mc, ret = results["tasks"]["mc"], results["tasks"]["ret"]
    # The label-prior baseline needs answer classes; (clip, caption) pairs have none.
    assert "em_prior" not in mc["methods"] and {"fine_tune", "stablesynth", "duet"} <= set(mc["methods"])
    assert mc["chance"] == pytest.approx(0.2) and mc["clips"] == 5 * mc["clips_per_device"]
    ours = ret["methods"]["stablesynth"]
    assert set(ours["pooled"]) == {"seen", "unseen"} and set(ours["session"]["seen"]) == {
        f"{d}@{k}" for d in ("VR", "TR") for k in (1, 5, 10)}
    assert ret["chance"]["pooled"]["seen"]["TR@1"] == pytest.approx(1 / 24)
    assert ours["accuracy"]["per_sample"]["per_device"].keys() == mc["methods"]["stablesynth"]["accuracy"][
        "per_sample"]["per_device"].keys()
    assert mc["oracle"]["accuracy"]["all"]["n"] == 5
    report = (all_tasks / "report.md").read_text()
    assert report == render_report(results)
    for heading in ("Table 1 layout", "Multiple choice on captions", "Retrieval on captions"):
        assert heading in report
    assert "points of MC accuracy" in report and "points of session VR@1" in report


def test_a_caption_task_alone_reuses_the_stage_1_models(all_tasks: Path, capsys):
    assert main(["demo", "--quick", "--task", "ret", "--out", str(all_tasks)]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing finished checkpoint") == 2  # the QA stage 1 and the matching model's
    results = load_results(all_tasks / "results.json")
    assert results["methods"] == {} and set(results["tasks"]) == {"ret"}
    report = (all_tasks / "report.md").read_text()
    assert "Retrieval on captions" in report and "Table 1 layout" not in report and "Multiple choice" not in report


def test_schema_checks_the_tasks(all_tasks: Path):
    results = json.loads((all_tasks / "results.json").read_text())
    results["tasks"]["ret"]["methods"]["fine_tune"]["accuracy"]["per_sample"]["per_device"].pop("0")
    with pytest.raises(ResultsSchemaError, match=r"tasks\.ret\.methods\.fine_tune"):
        validate_results(results)
