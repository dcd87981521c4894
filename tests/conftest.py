"""Fixtures shared across the test packages: tiny video and annotation writers, a tiny benchmark.

Test files run with ``--import-mode=importlib`` and cannot import this module, so the
helpers are handed out as fixtures that return the function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stablesynth.data import export
from stablesynth.data.benchmark import DeviceBenchmark
from stablesynth.data.benchmark_config import BenchmarkConfig


def _pick_codec(names: Sequence[str]) -> str:
    """The first of ``names`` this PyAV build can encode with; skips the test when there is none."""
    try:
        return export.pick_codec(names)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _write_frames(path: Path, frames: Sequence[np.ndarray], codec: str, pix_fmt: str = "yuv420p") -> Path:
    """Encode RGB uint8 frames at 4 fps into ``path`` (its folder is created)."""
    return export.write_mp4(path, frames, codec, pix_fmt=pix_fmt)


def _write_video(path: Path, rgb: tuple[int, int, int], seed: int, size: int = 24, frames: int = 4) -> Path:
    """An mp4 of ``frames`` noisy frames of colour ``rgb`` (noise drawn from ``seed``)."""
    codec = _pick_codec(export.MP4_CODECS)
    rng = np.random.default_rng(seed)
    imgs = [np.clip(np.array(rgb) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            for _ in range(frames)]
    return _write_frames(path, imgs, codec)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def pick_codec() -> Callable[[Sequence[str]], str]:
    """``pick_codec(names)``: the first encoder available; skips the test when there is none."""
    return _pick_codec


@pytest.fixture(scope="session")
def write_frames() -> Callable[..., Path]:
    """``write_frames(path, frames, codec, pix_fmt="yuv420p")``: encode RGB frames into a video file."""
    return _write_frames


@pytest.fixture(scope="session")
def write_video() -> Callable[..., Path]:
    """``write_video(path, rgb, seed, size=24, frames=4)``: a tiny noisy single-colour mp4."""
    return _write_video


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, Iterable[dict[str, Any]]], Path]:
    """``write_jsonl(path, rows)``: a JSON-lines annotation file."""
    return _write_jsonl


@pytest.fixture(scope="module")
def tiny_bench() -> DeviceBenchmark:
    """A three-device benchmark (one unseen) with 16 px frames, for training tests."""
    return DeviceBenchmark.build(
        BenchmarkConfig(n_devices=3, n_unseen=1, history_per_device=16, realtime_per_device=8, image_size=16)
    )


#: Questions of the tiny test bundle's task (the exporter prunes the word table to their tokens).
TEST_QUESTIONS = ("what color is the shape?", "is there a circle?", "what shape is it?", "is it red?")


def _export_test_bundle(cloud: Any, out: Path, int8: bool = False) -> Path:
    """A real device bundle of ``cloud`` with the tiny ``allinone-test`` encoder (random weights), no parity run."""
    import torch

    from stablesynth.assets import minilm_dir
    from stablesynth.cloud.export import export_device_bundle
    from stablesynth.data.benchmark import FRAME_MEAN, FRAME_STD
    from stablesynth.models.encoder import create_model
    from stablesynth.models.global_model import GlobalModel

    torch.manual_seed(0)
    stage1 = GlobalModel(create_model("allinone-test"), cloud.num_classes).eval()
    pre = {"image_size": 16, "mean": list(FRAME_MEAN), "std": list(FRAME_STD), "frames_per_clip": 3,
           "global_frames": 2, "global_sampling": "uniform", "upload_frame": "middle", "max_question_len": 8}
    tokenizer_json = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    answers = [f"answer{i}" for i in range(cloud.num_classes)]
    return export_device_bundle(cloud, stage1, pre, answers, TEST_QUESTIONS, tokenizer_json, out, int8=int8,
                                encoder_name="allinone-test")


@pytest.fixture(scope="session")
def export_test_bundle() -> Callable[..., Path]:
    """``export_test_bundle(cloud, out_dir, int8=False)``: a real device bundle with a tiny random encoder."""
    return _export_test_bundle
