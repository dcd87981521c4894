"""``stablesynth bench train``: the paper-size throughput benchmark that needs only PyTorch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stablesynth.bench.train import (
    MSRVTT_QA_TRAIN_CLIPS,
    PAPER_EPOCH_S,
    PRESETS,
    format_table,
    run_train_benchmark,
)
from stablesynth.models.encoder import ENCODERS, EncoderConfig, MultimodalEncoder
from stablesynth.models.vit import ViTSpec
from stablesynth.presets import get_preset

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = ["--preset", "allinone-cpu", "--device", "cpu", "--batch-size", "2", "--eval-batch-size", "2",
        "--steps", "1", "--warmup", "0"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_bench_presets_are_the_registered_encoders(name):
    spec = ViTSpec(**PRESETS[name].spec)
    registered = ENCODERS.get(name)
    for field in dataclasses.fields(ViTSpec):
        assert getattr(spec, field.name) == getattr(registered, field.name), field.name
    paper = get_preset("msrvtt-qa")
    assert PRESETS[name].num_classes == paper.num_classes and PRESETS[name].frames == paper.frames


def test_vit_spec_builds_the_same_network_as_the_config():
    cfg = ENCODERS.get("allinone-test")
    spec = ViTSpec(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ViTSpec)})
    torch.manual_seed(0)
    a = MultimodalEncoder(cfg)
    torch.manual_seed(0)
    b = MultimodalEncoder(spec)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(cfg, EncoderConfig)
    with pytest.raises(ValueError, match="patch_size"):
        ViTSpec(image_size=30, patch_size=8).check()


def test_benchmark_reports_throughput_beside_the_paper():
    r = run_train_benchmark("allinone-cpu", "cpu", batch_size=2, eval_batch_size=3, steps=2, warmup=1)
    s1, fx = r["stage1"], r["features"]
    assert (s1["clips"], fx["clips"]) == (4, 6)
    assert r["precision"] == "float32" and r["device_type"] == "cpu"
    assert s1["clips_per_s"] > 0 and fx["clips_per_s"] > 0
    assert s1["epoch_s"] == pytest.approx(MSRVTT_QA_TRAIN_CLIPS / s1["clips_per_s"])
    assert s1["paper_clips_per_s"] == pytest.approx(MSRVTT_QA_TRAIN_CLIPS / PAPER_EPOCH_S)
    assert s1["paper_seconds_same_clips"] == pytest.approx(4 * PAPER_EPOCH_S / MSRVTT_QA_TRAIN_CLIPS)
    assert s1["speedup_vs_paper"] == pytest.approx(s1["clips_per_s"] / s1["paper_clips_per_s"])
    table = format_table(r)
    assert "897 s/epoch" in table and "stage 1" in table and "feature extraction" in table
    json.dumps(r)
    with pytest.raises(ValueError, match="unknown preset"):
        run_train_benchmark("vit-huge", "cpu")
    with pytest.raises(ValueError, match="--steps"):
        run_train_benchmark("allinone-cpu", "cpu", steps=0)


BLOCKER = textwrap.dedent('''
    import importlib.machinery
    import runpy
    import sys

    # A machine with only PyTorch: none of the project's other dependencies can be found.
    BLOCKED = {"numpy", "pydantic", "yaml", "transformers", "tokenizers", "safetensors", "tqdm", "PIL", "av",
               "fastapi", "uvicorn", "onnx", "onnxruntime", "onnxscript", "matplotlib", "easy_vqa", "httpx",
               "prometheus_client", "tomli"}

    class OnlyTorch(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [OnlyTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    sys.argv = ["stablesynth.bench.train", *sys.argv[1:]]
    try:
        runpy.run_module("stablesynth.bench.train", run_name="__main__", alter_sys=True)
    finally:
        loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
        assert not loaded, loaded
''')


def test_runs_where_only_pytorch_is_installed(tmp_path):
    script = tmp_path / "only_torch.py"
    script.write_text(BLOCKER)
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(script), *TINY, "--json", str(out)], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1 (train step)" in proc.stdout and "897 s/epoch" in proc.stdout
    result = json.loads(out.read_text())
    assert result["stage1"]["clips"] == 2 and result["preset"] == "allinone-cpu"


def test_cli_subcommand(capsys, tmp_path):
    from stablesynth.cli import main

    assert main(["bench", "train", *TINY, "--json", str(tmp_path / "r.json")]) == 0
    assert "feature extraction" in capsys.readouterr().out
    assert main(["bench", "train", "--preset", "allinone-cpu", "--device", "cuda:x"]) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paper_preset_on_cuda():
    r = run_train_benchmark("allinone-ti", "cuda", batch_size=32, eval_batch_size=32, steps=2, warmup=1)
    assert r["device_type"] == "cuda" and r["precision"] == "bfloat16"
    assert r["stage1"]["clips_per_s"] > 0 and r["features"]["clips_per_s"] > 0
