"""`stablesynth train` / `eval` for multiple choice (msrvtt-mc) and retrieval (msrvtt-ret) on tiny
fixtures in the published formats (MSR_VTT.json + JSFusion lists, msrvtt_mc_test.jsonl) with PyAV videos."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stablesynth.cli import main
from stablesynth.data.annotation_records import RetrievalRecord
from stablesynth.evaluation.schema import load_results
from stablesynth.experiment.realdata.config import load_realdata_config
from stablesynth.experiment.realdata.pairs import all_pairs_items, negative_sampled_items
from stablesynth.experiment.realdata.run import VideoRun, accuracy_table

COLOURS = {"red": (230, 30, 30), "green": (30, 220, 40), "blue": (30, 40, 230)}
DISTRACTORS = ["a dog runs", "a man talks"]


def make_msrvtt(root: Path, write_video, write_jsonl, n_train: int = 6, n_test: int = 6,
                retrieval_files: bool = True) -> Path:
    """MSRVTT retrieval (MSR_VTT.json, train/val JSFusion lists) and MSRVTT-MC test items, same videos."""
    names = list(COLOURS)
    videos, anns, lists, mc = [], [], {"train": [], "test": []}, []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        for i in range(n):
            vid = f"video{offset + i}"
            colour = names[i % len(names)]
            write_video(root / "videos" / "all" / f"{vid}.mp4", COLOURS[colour], seed=offset + i, size=16,
                        frames=3)
            videos.append({"video_id": vid, "category": i % 2})
            anns.append({"image_id": vid, "caption": f"a {colour} video"})
            if split == "train":
                anns.append({"image_id": vid, "caption": f"something {colour}"})
            lists[split].append(vid)
            if split == "test":
                options = [f"a {c} video" for c in names] + DISTRACTORS
                order = np.random.default_rng(i).permutation(len(options)).tolist()
                options = [options[j] for j in order]
                # One item's "right" caption disagrees with the picture, so accuracy is not trivially 1.
                right = f"a {names[(i + 1) % 3]} video" if i == 4 else f"a {colour} video"
                mc.append({"clip_name": vid, "options": options, "answer": options.index(right)})
    ann_dir = root / "annotation"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / "MSR_VTT.json").write_text(json.dumps({"videos": videos, "annotations": anns}))
    if retrieval_files:
        (root / "train_list_jsfusion.txt").write_text("\n".join(lists["train"]) + "\n")
        (root / "val_list_jsfusion.txt").write_text("\n".join(lists["test"]) + "\n")
    write_jsonl(root / "msrvtt_mc_test.jsonl", mc)
    return root


SMALL = {
    "encoder": "allinone-test",
    "stage1": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "head_dropout": 0.0},
    "stage2": {"epochs": 1, "batch_size": 16},
    "eval_batch_size": 16,
    "shard_batches": 2,
    "adapt_timing_repeats": 3,
    "negatives": 2,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_video, write_jsonl):
    return make_msrvtt(tmp_path_factory.mktemp("msrvtt") / "data", write_video, write_jsonl)


def _train(data: Path, base: Path, preset: str) -> Path:
    cfg = base / f"{preset}.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = base / preset
    assert main(["train", "--preset", preset, "--data-root", str(data), "--out", str(out),
                 "--config", str(cfg)]) == 0
    return out


@pytest.fixture(scope="module")
def mc_run(data, tmp_path_factory):
    return _train(data, tmp_path_factory.mktemp("mc"), "msrvtt-mc")


@pytest.fixture(scope="module")
def ret_run(data, tmp_path_factory):
    return _train(data, tmp_path_factory.mktemp("ret"), "msrvtt-ret")


# em_prior needs answer classes, so pair tasks skip it.
METHODS = {"f_linear", "fine_tune", "f_hyper", "duet", "stablesynth", "stage2_control"}


def test_mc_train_writes_valid_results(mc_run):
    results = load_results(mc_run / "results.json")
    bench = results["benchmark"]
    assert bench["dataset"] == "msrvtt-mc" and bench["task"] == "mc_qa" and bench["num_classes"] == 1
    assert bench["candidates"] == 5
    # 6 train videos × 2 captions, each with 2 sampled negatives; 6 test items × 5 candidates.
    assert bench["items"] == {"history": 12, "realtime": 6}
    assert bench["counts"] == {"history": 36, "realtime": 30}
    assert "retrieval" in bench["train_data"]
    assert set(results["methods"]) == METHODS
    for m in results["methods"].values():
        assert 0.0 <= m["mc_accuracy"] <= 1.0 and 0.0 <= m["mc_accuracy_per_session"] <= 1.0
        # Per-device accuracy is over each device's items; 6 items, 3 per device.
        per_dev = m["accuracy"]["per_sample"]["per_device"]
        assert sum(per_dev.values()) / len(per_dev) == pytest.approx(m["mc_accuracy"])
    ours = results["methods"]["stablesynth"]
    assert ours["bytes"]["up"] == 192 * 4 and ours["bytes"]["down"]["fp32"] == 97 * 4
    assert ours["flops"]["paper_K"] == 1
    assert "Multiple choice" in (mc_run / "report.md").read_text()


def test_mc_eval_reproduces_train(mc_run, tmp_path):
    assert main(["eval", "--checkpoint-dir", str(mc_run), "--out", str(tmp_path / "ev")]) == 0
    again = load_results(tmp_path / "ev" / "results.json")
    first = load_results(mc_run / "results.json")
    assert json.dumps(accuracy_table(again), sort_keys=True) == json.dumps(accuracy_table(first), sort_keys=True)
    assert {n: m["mc_accuracy"] for n, m in again["methods"].items()} == \
        {n: m["mc_accuracy"] for n, m in first["methods"].items()}
    assert (tmp_path / "ev" / "features" / "trained-realtime" / "manifest.json").is_file()


def test_ret_train_writes_valid_results(ret_run):
    results = load_results(ret_run / "results.json")
    bench = results["benchmark"]
    assert bench["task"] == "retrieval" and bench["num_classes"] == 1
    # Every (caption, video) pair of the 6 test videos is scored.
    assert bench["counts"]["realtime"] == 36 and bench["candidates"] == 6
    keys = {"VR@1", "VR@5", "VR@10", "TR@1", "TR@5", "TR@10"}
    for m in results["methods"].values():
        assert set(m["retrieval"]) == keys and set(m["retrieval_per_session"]) == keys
        assert all(0.0 <= v <= 1.0 for v in m["retrieval"].values())
        assert m["retrieval"]["TR@10"] == 1.0  # 6 videos: the right one is always in the top 10
        per_dev = m["accuracy"]["per_sample"]["per_device"]
        assert sum(per_dev.values()) / len(per_dev) == pytest.approx(m["retrieval"]["TR@1"])
    assert results["methods"]["stablesynth"]["config"]["driver_dim"] == 256
    assert "Retrieval" in (ret_run / "report.md").read_text()


def test_ret_eval_reproduces_train(ret_run, tmp_path):
    assert main(["eval", "--checkpoint-dir", str(ret_run), "--out", str(tmp_path / "ev")]) == 0
    again = load_results(tmp_path / "ev" / "results.json")
    first = load_results(ret_run / "results.json")
    assert json.dumps(accuracy_table(again), sort_keys=True) == json.dumps(accuracy_table(first), sort_keys=True)
    assert {n: m["retrieval"] for n, m in again["methods"].items()} == \
        {n: m["retrieval"] for n, m in first["methods"].items()}


def test_mc_without_training_pairs_says_so(tmp_path, capsys, write_video, write_jsonl):
    root = make_msrvtt(tmp_path / "d", write_video, write_jsonl, n_train=0, n_test=3, retrieval_files=False)
    assert main(["train", "--preset", "msrvtt-mc", "--data-root", str(root), "--out", str(tmp_path / "o")]) == 2
    assert "train_from" in capsys.readouterr().err


def test_mc_train_from_file(tmp_path, write_video, write_jsonl):
    root = make_msrvtt(tmp_path / "d", write_video, write_jsonl, n_train=0, n_test=3, retrieval_files=False)
    cfg = load_realdata_config("msrvtt-mc", data_root=str(root), encoder="allinone-test",
                               train_from=str(root / "msrvtt_mc_test.jsonl"))
    run = VideoRun(cfg, tmp_path / "o", log=lambda _: None)
    assert run.items == {"history": 3, "realtime": 3}
    assert len(run.train_dataset) == 15 and "msrvtt_mc_test.jsonl" in run.train_source


def _pairs(n_videos: int, per_video: int) -> list[RetrievalRecord]:
    return [RetrievalRecord(sample_id=v * per_video + c, video_id=f"v{v}", media_path=Path(f"v{v}.mp4"),
                            caption=f"caption {v}.{c}") for v in range(n_videos) for c in range(per_video)]


def test_negative_sampling_is_seeded_and_excludes_the_video():
    pairs = _pairs(4, 3)
    items = negative_sampled_items(pairs, negatives=4, seed=7)
    assert items == negative_sampled_items(pairs, negatives=4, seed=7)
    assert items != negative_sampled_items(pairs, negatives=4, seed=8)
    for p, item in zip(pairs, items, strict=True):
        assert len(item.options) == 5 and item.options[item.answer] == p.caption
        others = [o for i, o in enumerate(item.options) if i != item.answer]
        assert all(not o.startswith(f"caption {p.video_id[1:]}.") for o in others)
    # A sentence that also describes another video is never that video's negative.
    same = [dataclasses.replace(p, caption="a red video") if p.sample_id % 3 == 0 else p for p in pairs]
    for item in negative_sampled_items(same, negatives=4, seed=0):
        others = [o for i, o in enumerate(item.options) if i != item.answer]
        assert "a red video" not in others


def test_all_pairs_items_put_the_truth_on_the_diagonal():
    items = all_pairs_items(_pairs(3, 1))
    assert [it.answer for it in items] == [0, 1, 2]
    assert all(it.options == ("caption 0.0", "caption 1.0", "caption 2.0") for it in items)


def test_pair_logits_make_cross_entropy_binary():
    s = torch.tensor([[2.0], [-1.0], [0.5]])
    label = torch.tensor([1, 0, 0])
    two = torch.cat([torch.zeros_like(s), s], dim=-1)
    ce = torch.nn.functional.cross_entropy(two, label)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s[:, 0], label.float())
    assert torch.allclose(ce, bce)
