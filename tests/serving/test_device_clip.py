"""`stablesynth device predict --clip`: a real easy-VQA clip, encoded on the device, through the round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stablesynth.cli import main


def test_missing_run_dir_says_run_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["device", "predict", "--server", "http://127.0.0.1:9", "--bundle", str(tmp_path / "b"),
               "--run-dir", str(tmp_path / "nope"), "--clip", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "does not exist" in err and "stablesynth demo" in err


@pytest.mark.slow
def test_predict_a_benchmark_clip_through_the_server(live_server: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from stablesynth.data.clip_loader import make_loader
    from stablesynth.serving.clip import clip_features, load_benchmark, load_encoder
    from stablesynth.serving.server import create_app, load_cloud_model
    from stablesynth.training.features import load_features

    run = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(run)]) == 0
    ckpt = run / "methods" / "stablesynth"
    bundle = tmp_path / "bundle"
    assert main(["device", "export", "--checkpoint", str(ckpt), "--out", str(bundle)]) == 0

    # The device's features are the run's own: the same clip row of its real-time feature cache.
    clip = clip_features(run, device=1, clip=2)
    _, manifest = load_encoder(run)
    bench = load_benchmark(run, manifest["benchmark"])
    row = int(make_loader(bench, "realtime", [1], batch_size=1).dataset[2])
    cached = load_features(run / "features" / "trained-realtime")
    torch.testing.assert_close(clip.frames, cached["frames"][row], atol=1e-4, rtol=1e-4)
    assert clip.upload_index == int(cached["upload_index"][row]) and clip.label == int(cached["label"][row])

    cloud = load_cloud_model(ckpt)
    with live_server(create_app({cloud.model_id: cloud})) as srv:
        capsys.readouterr()
        assert main(["device", "predict", "--server", srv.url, "--bundle", str(bundle), "--run-dir", str(run),
                     "--device", "1", "--clip", "2", "--encoding", "factors"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert "device 1 clip 2" in lines[-2] and "Θ_d from server" in lines[-2]
    assert out["source"] == "server" and out["error"] is None and out["bytes_down"] > 0
    assert out["answer"] in clip.answers and out["true_answer"] == clip.true_answer
    assert out["upload_index"] == clip.upload_index and out["global_index"] == clip.global_index
    # The device's answer is the cloud model's own prediction for this clip.
    with torch.inference_mode():
        params = cloud.method.adapt(clip.upload[None])
        ref = cloud.method.predict(clip.f_g[None], params)[0]
    assert out["prediction"] == int(np.argmax(ref.numpy()))
