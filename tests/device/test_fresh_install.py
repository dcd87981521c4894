"""The device package on its own: a fresh virtual environment with only ``pip install ./device``, no torch,
against a real ``stablesynth serve`` started from the full environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("device-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "constraints.txt"),
                          str(REPO / "device")], capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.fail(f"pip install ./device failed:\n{pip.stdout[-2000:]}\n{pip.stderr[-2000:]}")
    return venv


@pytest.mark.slow
def test_device_env_has_no_torch_and_predicts_against_a_real_server(device_venv: Path, tmp_path: Path,
                                                                    export_test_bundle: Any) -> None:
    import torch

    from stablesynth.cloud.server import load_cloud_model, save_cloud_model
    from stablesynth.methods.base import METHODS
    from stablesynth.methods.config import MethodConfig

    py = device_venv / "bin" / "python"
    for banned in ("torch", "transformers", "fastapi", "numba", "stablesynth"):
        probe = subprocess.run([str(py), "-c", f"import {banned}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, banned
    # Every module of the device package imports in that environment.
    mods = "stablesynth_device.cli, stablesynth_device.client, stablesynth_device.runtime, stablesynth_device.frames"
    assert subprocess.run([str(py), "-c", f"import {mods}"], capture_output=True).returncode == 0

    torch.manual_seed(11)
    method = METHODS.get("stablesynth")(MethodConfig(), 13).eval()
    with torch.no_grad():  # a random modulation, so Θ_d depends on the upload
        for p in method.generator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = save_cloud_model(tmp_path / "ckpt", method, "easyvqa")
    bundle = export_test_bundle(load_cloud_model(ckpt), tmp_path / "bundle", int8=True)
    clip = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", clip)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "stablesynth.cli", "serve", "--checkpoint", str(ckpt),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    device = [str(device_venv / "bin" / "stablesynth-device"), "predict", "--bundle", str(bundle),
              "--npy", str(tmp_path / "clip.npy"), "--question", "what shape is it?", "--json"]

    def predict(*flags: str) -> dict[str, Any]:
        r = subprocess.run([*device, *flags], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        return json.loads(r.stdout)

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        for encoding in ("fp32", "int8", "factors", "driver"):
            out = predict("--server", url, "--encoding", encoding)
            assert out["source"] == "server" and out["error"] is None and out["bytes_down"] > 0, out
        first = predict("--server", url, "--int8")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
    offline = predict("--offline", "--int8")
    assert offline["source"] == "cache" and offline["answer"] == first["answer"]
    down = predict("--server", url, "--timeout", "0.5")  # the server is gone: the cached Θ_d, and why
    assert down["source"] == "cache" and "unreachable" in down["error"]
    bad = subprocess.run([*device[:-1], "--server", url, "--npy", str(tmp_path / "missing.npy")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.npy" in bad.stderr and "Traceback" not in bad.stderr
