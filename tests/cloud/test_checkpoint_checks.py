"""Checkpoints that would start and then fail (or not start at all) are refused at load, in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from stablesynth import checkpoint
from stablesynth.checkpoint import CheckpointError
from stablesynth.cloud.model import MAX_WEIGHT_ABS
from stablesynth.cloud.server import load_cloud_model, save_cloud_model


@pytest.fixture(scope="module")
def ckpt(method_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_cloud_model(tmp_path_factory.mktemp("ck") / "ckpt", method_factory(seed=5), "easyvqa")


def _edited(ckpt: Path, tmp_path: Path, **fields: Any) -> Path:
    d = tmp_path / "edited"
    shutil.copytree(ckpt, d)
    m = json.loads((d / "manifest.json").read_text())
    m.update(fields)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _refused(directory: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_cloud_model(directory)
    msg = str(err.value)
    assert "\n" not in msg and str(directory) in msg and all(w in msg for w in words), msg


def test_a_checkpoint_of_another_kind_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _refused(_edited(ckpt, tmp_path, kind="module"), "'kind'", "'module'", "'method'")


def test_an_integer_tensor_where_the_module_holds_floats_is_refused(ckpt: Path, tmp_path: Path) -> None:
    tensors, manifest = checkpoint.load_checkpoint(ckpt)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].round().to(torch.int32)
    fields = {k: v for k, v in manifest.items() if k not in (*checkpoint.RESERVED_FIELDS, "model_version")}
    d = checkpoint.save_checkpoint(tmp_path / "int", tensors, fields, kind="method")
    _refused(d, repr(name), "int32", "float32")


def test_finite_but_absurd_weights_are_refused(method_factory: Any, tmp_path: Path) -> None:
    method = method_factory(seed=6)
    name, param = next(iter(method.generator.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = 1e38
    _refused(save_cloud_model(tmp_path / "big", method, "easyvqa"), f"generator.{name}", f"{MAX_WEIGHT_ABS:g}")


def test_config_dimensions_beyond_the_bound_are_refused_before_any_allocation(ckpt: Path, tmp_path: Path) -> None:
    config = json.loads((ckpt / "manifest.json").read_text())["config"]
    # 77 GB of projector weights: allocating them would fail with PyTorch's allocator error instead
    _refused(_edited(ckpt, tmp_path, config={**config, "driver_dim": 10**8}), "'config'", "at most")
