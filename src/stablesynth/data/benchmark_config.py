"""The benchmark's config (DESIGN.md §5): what defines the embedded easy-VQA device benchmark.

:class:`BenchmarkConfig` holds the device count, the clips per device and split, the clip
shape and the ranges the capture profiles are drawn from; :func:`load_config` reads one
from a file or gives the packaged default. The same config (and seed) gives the same
benchmark (:class:`stablesynth.data.benchmark.DeviceBenchmark`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from stablesynth.config import Config, FloatPair, require
from stablesynth.data.devices import JitterConfig, ProfileRanges

BenchSplit = Literal["history", "realtime"]
BENCH_SPLITS: tuple[str, ...] = ("history", "realtime")


def default_config_path() -> Path:
    """The packaged default benchmark config (``stablesynth/configs/benchmark.yaml``)."""
    return Path(str(resources.files("stablesynth") / "configs" / "benchmark.yaml"))


def _range(cfg: Config, key: str, lo_min: float | None = None, lo_gt: float | None = None) -> None:
    value = getattr(cfg, key)
    require(len(value) == 2, key, f"expected [low, high], got {list(value)}")
    lo, hi = value
    require(np.isfinite(lo) and np.isfinite(hi), key, f"values must be finite, got {list(value)}")
    require(lo <= hi, key, f"low {lo} is above high {hi}")
    if lo_min is not None:
        require(lo >= lo_min, key, f"low must be >= {lo_min}, got {lo}")
    if lo_gt is not None:
        require(lo > lo_gt, key, f"low must be > {lo_gt}, got {lo}")


class BenchmarkConfig(Config):
    """Everything that defines the benchmark; the same config (and seed) gives the same benchmark.

    frames_per_clip is N_f; global_frames is D, the frames averaged into F_g. image_size is
    the side the frames are resized to (the encoder preset decides; easy-VQA scenes are 64 px).
    skew_over chooses what the per-device Dirichlet(skew_alpha) draw weights.
    """

    seed: int = Field(0, ge=0)
    n_devices: int = Field(30, ge=1)
    n_unseen: int = Field(6, ge=0)
    history_per_device: int = Field(120, ge=1)
    realtime_per_device: int = Field(60, ge=1)
    #: History clips per seen device held out of training (its last ones): the validation clips on
    #: which hyper-parameters are chosen, never the real-time clips the report scores.
    validation_per_device: int = Field(0, ge=0)
    frames_per_clip: int = Field(5, ge=1)
    global_frames: int = Field(3, ge=1)
    image_size: int = Field(32, ge=8)
    #: Tokens of a question, [CLS] and [SEP] included.
    max_question_len: int = Field(16, ge=2)
    skew_over: Literal["answer", "question_type"] = "answer"
    #: Dirichlet concentration of the per-device usage skew.
    skew_alpha: float = Field(0.5, gt=0)
    gain_range: FloatPair = (0.55, 1.45)
    gamma_range: FloatPair = (0.7, 1.45)
    contrast_range: FloatPair = (0.7, 1.3)
    brightness_range: FloatPair = (-0.1, 0.1)
    noise_range: FloatPair = (0.0, 0.06)
    blur_range: FloatPair = (0.0, 1.2)
    drift: float = 0.05
    jitter_shift_px: float = 2.0
    jitter_noise_std: float = 0.01
    jitter_brightness_std: float = 0.02

    def check(self) -> None:
        require(
            self.n_unseen < self.n_devices,
            "n_unseen",
            f"must be below n_devices ({self.n_devices}) so some device is seen, got {self.n_unseen}",
        )
        require(self.validation_per_device < self.history_per_device, "validation_per_device",
                f"must be below history_per_device ({self.history_per_device}), got {self.validation_per_device}")
        require(
            self.global_frames <= self.frames_per_clip,
            "global_frames",
            f"D={self.global_frames} cannot exceed frames_per_clip N_f={self.frames_per_clip}",
        )
        _range(self, "gain_range", lo_min=0.0)
        _range(self, "gamma_range", lo_gt=0.0)
        _range(self, "contrast_range", lo_min=0.0)
        _range(self, "brightness_range")
        _range(self, "noise_range", lo_min=0.0)
        _range(self, "blur_range", lo_min=0.0)
        for key in ("drift", "jitter_shift_px", "jitter_noise_std", "jitter_brightness_std"):
            v = getattr(self, key)
            require(bool(np.isfinite(v)) and v >= 0, key, f"must be a finite value >= 0, got {v}")

    @classmethod
    def default(cls) -> BenchmarkConfig:
        """The packaged default config (falls back to the dataclass defaults if it is missing)."""
        path = default_config_path()
        return cls.from_file(path) if path.is_file() else cls()

    def ranges(self) -> ProfileRanges:
        return ProfileRanges(
            gain=tuple(self.gain_range),
            gamma=tuple(self.gamma_range),
            contrast=tuple(self.contrast_range),
            brightness=tuple(self.brightness_range),
            noise_std=tuple(self.noise_range),
            blur_sigma=tuple(self.blur_range),
        )

    def jitter(self) -> JitterConfig:
        return JitterConfig(self.jitter_shift_px, self.jitter_noise_std, self.jitter_brightness_std)



def load_config(path: str | Path | None = None) -> BenchmarkConfig:
    """A benchmark config from ``path``, or the packaged default."""
    return BenchmarkConfig.default() if path is None else BenchmarkConfig.from_file(path)
