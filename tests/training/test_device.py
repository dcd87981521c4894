"""The ``device`` parameter of stage 1, the feature cache and stage 2.

On CPU an explicit ``device="cpu"`` must be bit-identical to the default (the demo's
numbers do not move); the CUDA tests are marked ``gpu`` and skipped without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stablesynth.accelerator import DeviceError
from stablesynth.checkpoint import load_checkpoint
from stablesynth.data.clip_loader import make_loader
from stablesynth.methods import build_method
from stablesynth.models.encoder import create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.distributed import SINGLE, DistContext, init_distributed, training_device
from stablesynth.training.features import extract_features, load_features, to_feature_batch
from stablesynth.training.stage1 import Stage1Config, train_stage1
from stablesynth.training.stage2 import predict_per_sample, predict_per_session, train_method

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
QUIET = {"log": lambda *_: None}


def _model(k: int) -> GlobalModel:
    torch.manual_seed(0)
    return GlobalModel(create_model("allinone-test", max_text_len=16), k, dropout=0.1)


def _loader(tiny_bench):
    return lambda epoch: make_loader(tiny_bench, "history", "seen", batch_size=8, shuffle=True, seed=epoch)


def _stage1(tiny_bench, out: Path, **kw) -> tuple[GlobalModel, dict]:
    cfg = Stage1Config(epochs=2, lr=1e-3, batch_size=8, head_dropout=0.1)
    model = _model(tiny_bench.num_classes)
    info = train_stage1(model, _loader(tiny_bench), cfg, out, seed=3, **QUIET, **kw)
    return model, info


def _features(tiny_bench, encoder, out: Path, **kw) -> Path:
    n = (len(tiny_bench.rows("history", "all")) + 7) // 8
    return extract_features(encoder, lambda: make_loader(tiny_bench, "history", "all", batch_size=8), n, out,
                            {"test": 1}, **kw)


def test_training_device_defaults_to_cpu_and_follows_nccl(monkeypatch):
    assert training_device(None) == torch.device("cpu")
    assert training_device(None, SINGLE) == torch.device("cpu")
    assert training_device("cpu", SINGLE) == torch.device("cpu")
    monkeypatch.setattr(DistContext, "enabled", property(lambda self: True))
    # Under NCCL a rank trains on its own GPU whatever --device said; under gloo --device decides.
    nccl = DistContext(rank=1, world_size=2, local_rank=1, backend="nccl", device="cuda:1")
    assert training_device("cpu", nccl) == torch.device("cuda", 1)
    gloo = DistContext(rank=1, world_size=2, local_rank=1, backend="gloo", device="cpu")
    assert training_device(None, gloo) == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_fails_before_training(tmp_path, tiny_bench, monkeypatch):
    with pytest.raises(DeviceError):
        _stage1(tiny_bench, tmp_path / "s1", device="cuda")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DeviceError):
        init_distributed(device="cuda")
    assert init_distributed(device="cpu") is SINGLE


def test_explicit_cpu_is_bit_identical_to_the_default(tmp_path, tiny_bench):
    ref, ref_info = _stage1(tiny_bench, tmp_path / "ref")
    cpu, cpu_info = _stage1(tiny_bench, tmp_path / "cpu", device="cpu")
    assert [r["loss"] for r in ref_info["history"]] == [r["loss"] for r in cpu_info["history"]]
    for (name, a), b in zip(ref.state_dict().items(), cpu.state_dict().values()):
        assert torch.equal(a, b), name
    # The checkpoint is written from CPU tensors (no device recorded).
    tensors, _ = load_checkpoint(tmp_path / "cpu", expect_kind="stage1")
    assert all(t.device.type == "cpu" for t in tensors.values())

    ref_rows = load_features(_features(tiny_bench, ref.encoder, tmp_path / "f-ref"))
    cpu_path = _features(tiny_bench, cpu.encoder, tmp_path / "f-cpu", device="cpu")
    cpu_rows = load_features(cpu_path)
    assert ref_rows.keys() == cpu_rows.keys()
    assert all(torch.equal(ref_rows[k], cpu_rows[k]) for k in ref_rows)
    # A CPU cache's key is the caller's key, unchanged (existing caches stay valid).
    assert json.loads((cpu_path / "manifest.json").read_text())["key"] == {"test": 1}

    data = to_feature_batch(ref_rows)
    results = []
    for kw in ({}, {"device": "cpu"}):
        torch.manual_seed(1)
        method = build_method("stablesynth", tiny_bench.num_classes)
        info = train_method(method, data, 2, 16, 1e-3, 0.01, seed=5, **kw)
        results.append((info["history"], method.state_dict(), predict_per_sample(method, data, **kw),
                        predict_per_session(method, data.index(slice(0, 8)), **kw)))
    (h0, s0, p0, q0), (h1, s1, p1, q1) = results
    assert h0 == h1
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert torch.equal(p0, p1) and torch.equal(q0, q1)


@pytest.mark.gpu
@needs_gpu
def test_stage1_on_cuda_writes_a_checkpoint_that_loads_on_cpu(tmp_path, tiny_bench):
    model, info = _stage1(tiny_bench, tmp_path / "gpu", device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in info["history"])
    tensors, _ = load_checkpoint(tmp_path / "gpu", expect_kind="stage1")
    assert all(t.device.type == "cpu" for t in tensors.values())
    on_cpu = _model(tiny_bench.num_classes)
    on_cpu.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    # Resuming the finished run on CPU reuses it as is.
    again = train_stage1(on_cpu, _loader(tiny_bench), Stage1Config(epochs=2, lr=1e-3, batch_size=8, head_dropout=0.1),
                         tmp_path / "gpu", seed=3, device="cpu", **QUIET)
    assert again["trained_epochs"] == 0
    for (name, a), b in zip(model.state_dict().items(), on_cpu.state_dict().values()):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.gpu
@needs_gpu
def test_features_and_stage2_on_cuda_match_cpu(tmp_path, tiny_bench):
    model = _model(tiny_bench.num_classes).eval()
    cpu_rows = load_features(_features(tiny_bench, model.encoder, tmp_path / "f-cpu", device="cpu"))
    gpu_path = _features(tiny_bench, model.encoder, tmp_path / "f-gpu", device="cuda")
    assert json.loads((gpu_path / "manifest.json").read_text())["key"]["precision"] == "bfloat16"
    gpu_rows = load_features(gpu_path)
    assert gpu_rows["frames"].device.type == "cpu" and gpu_rows["frames"].dtype == torch.float32
    assert torch.allclose(cpu_rows["frames"], gpu_rows["frames"], atol=5e-2)
    assert torch.equal(cpu_rows["label"], gpu_rows["label"])

    data = to_feature_batch(cpu_rows)
    torch.manual_seed(1)
    method = build_method("stablesynth", tiny_bench.num_classes)
    info = train_method(method, data, 2, 16, 1e-3, 0.01, seed=5, device="cuda")
    assert info["steps"] > 0
    assert next(method.parameters()).device.type == "cuda"
    preds = predict_per_sample(method, data, device="cuda")
    session = predict_per_session(method, data.index(slice(0, 8)), device="cuda")
    assert preds.device.type == "cpu" and preds.shape == (len(data),)
    assert session.device.type == "cpu" and session.shape == (8,)
