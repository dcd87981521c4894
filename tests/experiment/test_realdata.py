"""`stablesynth train` / `eval` end to end on tiny MSRVTT-QA-format fixtures with real (PyAV) videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stablesynth.cli import main
from stablesynth.config import ConfigError
from stablesynth.evaluation.schema import load_results
from stablesynth.experiment.realdata.config import load_realdata_config
from stablesynth.experiment.realdata.run import accuracy_table
from stablesynth.methods import METHODS

COLOURS = {"red": (230, 30, 30), "green": (30, 220, 40), "blue": (30, 40, 230)}


def make_msrvtt_qa(root: Path, write_video, write_jsonl, n_train: int = 12, n_test: int = 6) -> Path:
    names = list(COLOURS)
    videos, rows = [], {"train": [], "test": []}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        for i in range(n):
            vid = f"video{offset + i}"
            colour = names[i % len(names)]
            write_video(root / "videos" / "all" / f"{vid}.mp4", COLOURS[colour], seed=offset + i)
            videos.append({"video_id": vid, "category": i % 2})
            # Some test answers disagree with the picture, so accuracies are not all 0 or 1.
            answer = names[(i + 1) % len(names)] if split == "test" and i % 4 == 3 else colour
            rows[split].append({"question": "what colour is the video?", "answer": answer, "video_id": vid})
    for split, items in rows.items():
        write_jsonl(root / f"msrvtt_qa_{split}.jsonl", items)
    (root / "msrvtt_train_ans2label.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    (root / "annotation").mkdir(exist_ok=True)
    (root / "annotation" / "MSR_VTT.json").write_text(json.dumps({"videos": videos, "annotations": []}))
    return root


SMALL = {
    "encoder": "allinone-test",
    "num_classes": 8,
    "stage1": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "head_dropout": 0.0},
    "stage2": {"epochs": 1, "batch_size": 8},
    "eval_batch_size": 4,
    "shard_batches": 1,
    "adapt_timing_repeats": 3,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_video, write_jsonl):
    base = tmp_path_factory.mktemp("msrvtt")
    data = make_msrvtt_qa(base / "data", write_video, write_jsonl)
    cfg = base / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = base / "run"
    assert main(["train", "--preset", "msrvtt-qa", "--data-root", str(data), "--out", str(out),
                 "--config", str(cfg)]) == 0
    return data, out


def test_train_writes_valid_results_with_paper_preset_fields(trained):
    _, out = trained
    results = load_results(out / "results.json")
    assert (out / "report.md").is_file()
    assert set(results["methods"]) == set(METHODS.names())
    bench = results["benchmark"]
    assert bench["num_classes"] == 8 and bench["dataset"] == "msrvtt-qa"
    assert [d["id"] for d in bench["devices"]] == [0, 1]  # the MSRVTT categories
    assert bench["counts"] == {"history": 12, "realtime": 6}
    assert results["oracle"] is None and results["informative"] is None
    assert results["methods"]["stablesynth"]["bytes"]["up"] == 192 * 4
    assert results["methods"]["stablesynth"]["flops"]["paper_K"] == 1501
    assert len(results["stage1"]["history"]) == 1
    assert (out / "methods" / "stablesynth" / "manifest.json").is_file()


def test_eval_reproduces_train_accuracy(trained, tmp_path):
    _, out = trained
    assert main(["eval", "--checkpoint-dir", str(out), "--out", str(tmp_path / "ev")]) == 0
    again = load_results(tmp_path / "ev" / "results.json")
    first = load_results(out / "results.json")
    # Same frames, same checkpoints, same batches: the numbers agree exactly (NaN for the empty group).
    assert json.dumps(accuracy_table(again), sort_keys=True) == json.dumps(accuracy_table(first), sort_keys=True)
    # The test clips were encoded again from the videos, not read from train's cache.
    assert (tmp_path / "ev" / "features" / "trained-realtime" / "manifest.json").is_file()


def test_second_train_reuses_finished_stages(trained, capsys):
    data, out = trained
    cfg = out.parent / "small.yaml"
    assert main(["train", "--preset", "msrvtt-qa", "--data-root", str(data), "--out", str(out),
                 "--config", str(cfg)]) == 0
    logs = capsys.readouterr().out
    assert "reusing finished checkpoint" in logs and "stage 2 stablesynth: reusing" in logs


def test_config_defaults_are_the_papers():
    cfg = load_realdata_config("msvd-qa", data_root="/nowhere")
    assert (cfg.stage1.lr, cfg.stage1.epochs) == (2e-5, 10)
    m = cfg.method_config("stablesynth")
    assert (m.lr, m.epochs, m.driver_dim) == (1e-4, 40, 96)
    assert cfg.label_count == 1001 and cfg.encoder_name == "allinone-ti"
    assert cfg.video_config().image_size == 224


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="preset"):
        load_realdata_config("easyvqa", data_root="/x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: {epochs: 1, lr_typo: 3}\n")
    with pytest.raises(ConfigError, match="lr_typo"):
        load_realdata_config("msrvtt-qa", bad)
    # A data root without the annotation files: one line naming the missing file.
    assert main(["train", "--preset", "msrvtt-qa", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
