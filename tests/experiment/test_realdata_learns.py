"""The real-data path learns: easy-VQA clips written as an MSRVTT download (mp4 videos + the
published annotation files, :func:`stablesynth.data.export.export_msrvtt`), then
``stablesynth train --preset msrvtt-mc | msrvtt-ret | msrvtt-qa`` on that folder, through the same
readers and PyAV decoding a user's MSRVTT goes through. Each run must beat chance by a margin.

Chance levels:
- multiple choice: 1/5 (five candidates; the four distractors share the clip's shape and differ in
  colour, so a right answer needs the clip's colour read off the video, matched to the caption);
- retrieval: every test caption ("a <colour> <shape>") belongs to exactly one of the 24 test videos,
  so R@1 by chance is 1/24 and R@5 is 5/24;
- open-ended QA: always answering the train split's most frequent answer.

Sizes are set for about 3–4 minutes on 2 CPU cores (most of it video decoding). The learning
settings were checked over several seeds: stage 1 at batch 64 and lr 1e-3 left the flat start of
matching (where every pair scores alike) within 2–5 of the 8 epochs for each seed tried.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from stablesynth.cli import main
from stablesynth.data.export import MP4_CODECS, export_msrvtt
from stablesynth.evaluation.schema import load_results

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 400, 48
SMALL = {
    "encoder": "allinone-test",
    # The word table is 30522 rows: updating it would dominate a CPU step, and random fixed word
    # vectors are as good as learnt ones for 24 captions.
    "encoder_overrides": {"freeze_word_embeddings": True},
    "methods": ["fine_tune", "stablesynth"],
    "stage2": {"epochs": 5, "batch_size": 64},
    "eval_batch_size": 64,
    "adapt_timing_repeats": 3,
}
PAIR = {**SMALL, "stage1": {"epochs": 8, "batch_size": 64, "lr": 1.0e-3, "head_dropout": 0.0},
        # One negative per pair: balanced match / non-match rows.
        "negatives": 1}
QA = {**SMALL, "num_classes": 13, "max_train": 800,
      "stage1": {"epochs": 5, "batch_size": 64, "lr": 1.0e-3, "head_dropout": 0.0}}
METHODS = ("fine_tune", "stablesynth")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, pick_codec) -> tuple[Path, dict]:
    codec = pick_codec(MP4_CODECS)  # skips without an mp4 encoder
    root = tmp_path_factory.mktemp("easyvqa-msrvtt")
    summary = export_msrvtt(root, n_train=N_TRAIN, n_test=N_TEST, mc_same_colour=0, codec=codec)
    return root, summary


def _train(dataset, tmp_path_factory, preset: str, config: dict) -> dict:
    root, _ = dataset
    base = tmp_path_factory.mktemp(preset)
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--preset", preset, "--data-root", str(root), "--out", str(base / "run"),
                 "--config", str(base / "config.yaml")]) == 0
    return load_results(base / "run" / "results.json")


@pytest.fixture(scope="module")
def mc(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory, "msrvtt-mc", PAIR)


@pytest.fixture(scope="module")
def ret(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory, "msrvtt-ret", PAIR)


@pytest.fixture(scope="module")
def qa(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory, "msrvtt-qa", QA)


def test_dataset_is_the_published_layout(dataset):
    root, summary = dataset
    assert summary["videos"] == {"train": N_TRAIN, "val": 0, "test": N_TEST}
    for name in ("annotation/MSR_VTT.json", "train_list_jsfusion.txt", "val_list_jsfusion.txt",
                 "msrvtt_mc_test.jsonl", "msrvtt_qa_train.jsonl", "msrvtt_qa_test.jsonl",
                 "msrvtt_train_ans2label.json", "videos/all/video0.mp4"):
        assert (root / name).is_file(), name
    assert summary["retrieval_test"] == 24 and summary["retrieval_chance_r1"] == pytest.approx(1 / 24)


def test_mc_learns(mc):
    chance = 1 / 5
    assert mc["benchmark"]["candidates"] == 5 and mc["benchmark"]["items"]["realtime"] == N_TEST
    for name in METHODS:
        acc = mc["methods"][name]["mc_accuracy"]
        assert acc >= chance + 0.3, f"{name}: MC accuracy {acc:.3f}, chance {chance:.2f}"


def test_retrieval_learns(ret):
    n = ret["benchmark"]["candidates"]
    assert n == 24  # one test video per caption, so each caption has one right video
    for name in METHODS:
        r = ret["methods"][name]["retrieval"]
        for direction in ("TR", "VR"):
            assert r[f"{direction}@1"] >= 3 / n, f"{name}: {direction}@1 {r[f'{direction}@1']:.3f}, chance {1 / n:.3f}"
            assert r[f"{direction}@5"] >= 5 / n + 0.3, f"{name}: {direction}@5 {r[f'{direction}@5']:.3f}, " \
                                                       f"chance {5 / n:.3f}"


def test_open_ended_qa_learns(qa, dataset):
    root, _ = dataset
    train = [json.loads(line) for line in (root / "msrvtt_qa_train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (root / "msrvtt_qa_test.jsonl").read_text().splitlines()]
    prior = Counter(r["answer"] for r in train[:QA["max_train"]]).most_common(1)[0][0]
    chance = sum(r["answer"] == prior for r in test) / len(test)
    for name in METHODS:
        acc = qa["methods"][name]["accuracy"]["per_sample"]["all"]["mean"]
        assert acc >= chance + 0.2, f"{name}: accuracy {acc:.3f}, most-frequent-answer baseline {chance:.3f}"
