"""The device runtime: the device model M_d exported to ONNX, run with ONNX Runtime.

The static MLP's weights are baked into the graph (they are deployed once);
the dynamic layer's weight ``[K, 96]`` and bias ``[K]`` are *graph inputs*, so
a new Θ_d from the cloud is used without re-exporting or reloading anything.
Batch size and K are dynamic axes.

Outputs match PyTorch's ``DeviceModel`` in eval mode within 1e-5 (absolute,
on logits of order 1; float32 on both sides, only the summation order differs).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stablesynth.models.device import FEATURE_DIM, HIDDEN_DIM, StaticHead, dynamic_linear

#: Documented agreement between ONNX Runtime and PyTorch logits (absolute).
ONNX_TOLERANCE = 1e-5
INPUT_NAMES = ("f_g", "weight", "bias")
OUTPUT_NAME = "logits"


class _ExportedDevice(nn.Module):
    """M_d with Θ_d as arguments: logits = W_d · static(F_g) + b_d."""

    def __init__(self, static: StaticHead) -> None:
        super().__init__()
        self.static = static

    def forward(self, f_g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return dynamic_linear(self.static(f_g), weight, bias)


def export_device_onnx(static: StaticHead, path: str | Path, num_classes: int = 13,
                       opset: int = 17) -> Path:
    """Write the device model to ``path`` with ``weight``/``bias`` as graph inputs.

    ``num_classes`` only sizes the example inputs; K is a dynamic axis.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _ExportedDevice(static).eval()
    hidden = static.fc.out_features
    example = (torch.zeros(2, static.fc.in_features), torch.zeros(num_classes, hidden),
               torch.zeros(num_classes))
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is the one that needs
        # no onnxscript at run time and gives a small static graph, so silence the notice.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(tmp), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes={"f_g": {0: "batch"}, "weight": {0: "num_classes"}, "bias": {0: "num_classes"},
                          OUTPUT_NAME: {0: "batch", 1: "num_classes"}},
            opset_version=opset, dynamo=False,
        )
    tmp.replace(path)
    return path


class DeviceRuntime:
    """An ONNX Runtime session of the exported device model.

    ``predict(f_g [B, 192] or [192], weight [K, 96], bias [K]) -> logits [B, K]`` (numpy float32).
    """

    def __init__(self, onnx_path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # A device runs one prediction at a time; one thread avoids pool wake-up costs at this size.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"device model not found: {self.path}")
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        if set(shapes) != set(INPUT_NAMES):
            raise ValueError(f"{self.path}: inputs {sorted(shapes)} are not {list(INPUT_NAMES)}")
        self.feature_dim = int(shapes["f_g"][1]) if isinstance(shapes["f_g"][1], int) else FEATURE_DIM
        self.hidden_dim = int(shapes["weight"][1]) if isinstance(shapes["weight"][1], int) else HIDDEN_DIM

    def predict(self, f_g: torch.Tensor | np.ndarray, weight: torch.Tensor | np.ndarray,
                bias: torch.Tensor | np.ndarray) -> np.ndarray:
        x = _f32(f_g)
        if x.ndim == 1:
            x = x[None]
        w, b = _f32(weight), _f32(bias)
        if x.shape[-1] != self.feature_dim or w.ndim != 2 or w.shape[1] != self.hidden_dim \
                or b.shape != (w.shape[0],):
            raise ValueError(f"shapes f_g {x.shape}, weight {w.shape}, bias {b.shape} do not fit "
                             f"[B, {self.feature_dim}], [K, {self.hidden_dim}], [K]")
        return self.session.run([OUTPUT_NAME], {"f_g": x, "weight": w, "bias": b})[0]


def _f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def measure_prediction_us(runtime: DeviceRuntime, num_classes: int, iters: int = 2000,
                          seed: int = 0) -> float:
    """Median µs of one single-clip prediction at ``num_classes`` (after a warm-up)."""
    g = np.random.default_rng(seed)
    f_g = g.standard_normal((1, runtime.feature_dim), dtype=np.float32)
    w = g.standard_normal((num_classes, runtime.hidden_dim), dtype=np.float32)
    b = g.standard_normal(num_classes, dtype=np.float32)
    for _ in range(50):
        runtime.predict(f_g, w, b)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        runtime.predict(f_g, w, b)
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e6)
