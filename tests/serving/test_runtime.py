"""ONNX device runtime: Θ_d as graph inputs, logits equal PyTorch's within 1e-5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stablesynth.models.device import DeviceModel
from stablesynth.serving.runtime import ONNX_TOLERANCE, DeviceRuntime, export_device_onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeviceModel, DeviceRuntime]:
    torch.manual_seed(0)
    model = DeviceModel(13).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so the test can see it
        model.static.norm.weight.normal_(1.0, 0.2)
        model.static.norm.bias.normal_(0.0, 0.2)
    path = export_device_onnx(model.static, tmp_path_factory.mktemp("onnx") / "device.onnx", 13)
    return model, DeviceRuntime(path)


@pytest.mark.parametrize(("k", "batch"), [(13, 1), (13, 7), (1501, 3)])
def test_onnx_matches_pytorch(exported: tuple[DeviceModel, DeviceRuntime], k: int, batch: int) -> None:
    model, runtime = exported
    g = torch.Generator().manual_seed(k + batch)
    f_g = torch.randn(batch, 192, generator=g)
    weight = torch.randn(k, 96, generator=g) * 0.1
    bias = torch.randn(k, generator=g) * 0.1
    with torch.no_grad():
        ref = model(f_g, {"weight": weight, "bias": bias}).numpy()
    out = runtime.predict(f_g, weight, bias)
    assert out.shape == (batch, k)
    np.testing.assert_allclose(out, ref, atol=ONNX_TOLERANCE, rtol=0)
    # The same session takes a different Θ_d without re-export (weights are inputs, not constants).
    out2 = runtime.predict(f_g, weight * 2, bias)
    assert not np.allclose(out, out2)


def test_single_vector_and_shape_errors(exported: tuple[DeviceModel, DeviceRuntime]) -> None:
    _, runtime = exported
    assert runtime.predict(np.zeros(192, np.float32), np.zeros((5, 96)), np.zeros(5)).shape == (1, 5)
    with pytest.raises(ValueError, match="do not fit"):
        runtime.predict(np.zeros(192), np.zeros((5, 96)), np.zeros(4))
    with pytest.raises(FileNotFoundError):
        DeviceRuntime(Path("/nonexistent/device.onnx"))
