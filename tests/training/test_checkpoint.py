import json
import os

import pytest
import torch
from torch import nn

from stablesynth.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
    save_module,
)
from stablesynth.models.encoder import create_model


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(13, 96, generator=g), "bias": torch.randn(13, generator=g),
            "steps": torch.tensor([7], dtype=torch.int64)}


def test_round_trip_and_manifest_fields(tmp_path):
    d = tmp_path / "ckpt"
    save_checkpoint(d, _tensors(), {"method": "stablesynth", "num_classes": 13, "config": {"lr": 1e-4}},
                    kind="method")
    assert sorted(os.listdir(d)) == ["manifest.json", "model.safetensors"]
    tensors, manifest = load_checkpoint(d, expect_kind="method")
    for name, t in _tensors().items():
        assert torch.equal(tensors[name], t) and tensors[name].dtype == t.dtype
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["method"] == "stablesynth" and manifest["num_classes"] == 13
    assert manifest["config"] == {"lr": 1e-4}
    assert manifest["tensors"]["weight"] == {"shape": [13, 96], "dtype": "float32"}
    assert set(manifest["packages"]) >= {"stablesynth", "torch"}
    assert len(manifest["sha256"]) == 64
    with pytest.raises(CheckpointError, match="expected 'encoder'"):
        load_checkpoint(d, expect_kind="encoder")


def test_truncated_weights_refused(tmp_path):
    d = save_checkpoint(tmp_path / "c", _tensors())
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt: sha256 mismatch"):
        load_checkpoint(d)


def test_edited_weights_refused(tmp_path):
    d = save_checkpoint(tmp_path / "c", _tensors())
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(d)


def test_edited_manifest_refused(tmp_path):
    d = save_checkpoint(tmp_path / "c", _tensors())
    m = json.loads((d / "manifest.json").read_text())
    m["tensors"]["weight"]["shape"] = [96, 13]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="tensor 'weight'"):
        load_checkpoint(d)
    m["tensors"]["extra"] = {"shape": [1], "dtype": "float32"}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="missing \\['extra'\\]"):
        load_checkpoint(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="does not parse"):
        load_checkpoint(d)


def test_unknown_format_version_refused(tmp_path):
    d = save_checkpoint(tmp_path / "c", _tensors())
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(d)


@pytest.mark.parametrize("missing", ["model.safetensors", "manifest.json"])
def test_missing_file_refused(tmp_path, missing):
    d = save_checkpoint(tmp_path / "c", _tensors())
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: {missing} is missing"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_failed_save_leaves_old_checkpoint_intact(tmp_path):
    d = save_checkpoint(tmp_path / "c", _tensors(), {"generation": 1})
    before = {p: (d / p).read_bytes() for p in os.listdir(d)}
    new = {k: v + 1 for k, v in _tensors().items()}
    # The weights are written before the manifest, so a manifest that cannot be serialised fails mid-save.
    with pytest.raises(TypeError):
        save_checkpoint(d, new, {"generation": 2, "oops": object()})
    assert {p: (d / p).read_bytes() for p in os.listdir(d)} == before
    assert os.listdir(tmp_path) == ["c"]  # no temporary directories left behind
    tensors, manifest = load_checkpoint(d)
    assert manifest["generation"] == 1 and torch.equal(tensors["weight"], _tensors()["weight"])


def test_replace_existing_checkpoint(tmp_path):
    d = save_checkpoint(tmp_path / "c", _tensors(), {"generation": 1})
    save_checkpoint(d, {"x": torch.zeros(2)}, {"generation": 2})
    tensors, manifest = load_checkpoint(d)
    assert manifest["generation"] == 2 and list(tensors) == ["x"]
    assert os.listdir(tmp_path) == ["c"]


def test_refuses_to_overwrite_a_non_checkpoint_directory(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_checkpoint(d, _tensors())
    assert (d / "precious.txt").read_text() == "keep me"


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # shared storage
        self.register_buffer("running", torch.arange(4.0))
        self.register_buffer("view", torch.arange(16.0).reshape(4, 4).T)  # non-contiguous


def test_module_with_shared_noncontiguous_tensors_and_buffers(tmp_path):
    torch.manual_seed(0)
    src = _Tied()
    src.running.add_(3)
    save_module(tmp_path / "m", src, {"num_classes": 4})
    dst = _Tied()
    manifest = load_module_state(tmp_path / "m", dst, expect_kind="module")
    assert manifest["module_class"] == "_Tied"
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_module_key_and_shape_mismatch_is_clear(tmp_path):
    save_module(tmp_path / "m", nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match=r"key 'weight' has shape \[3, 4\]"):
        load_module_state(tmp_path / "m", nn.Linear(4, 5))
    with pytest.raises(CheckpointError, match=r"missing keys \['0\.bias'"):
        load_module_state(tmp_path / "m", nn.Sequential(nn.Linear(4, 3)))


def test_encoder_saved_and_reloaded_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    enc = create_model("allinone-test").eval()
    fields = {"encoder": "allinone-test", "config": enc.cfg.to_dict()}
    save_module(tmp_path / "enc", enc, fields, kind="encoder")
    torch.manual_seed(1)
    other = create_model("allinone-test").eval()
    frames = torch.randn(2, 2, 3, 16, 16)
    ids = torch.randint(0, 30522, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    assert not torch.equal(other(frames, ids, mask), enc(frames, ids, mask))
    manifest = load_module_state(tmp_path / "enc", other, expect_kind="encoder")
    assert manifest["config"]["depth"] == 1
    with torch.no_grad():
        assert torch.equal(other(frames, ids, mask), enc(frames, ids, mask))
