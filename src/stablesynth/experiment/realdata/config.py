"""Config of a run on the paper's real video datasets: the preset's hyper-parameters, then the user's file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stablesynth.config import Config, ConfigError, read_config_file, require
from stablesynth.data.qa_formats import QA_DATASETS
from stablesynth.data.video_dataset import VideoDatasetConfig
from stablesynth.experiment.demo import all_methods, check_method_names
from stablesynth.methods import METHODS, MethodConfig, default_method_config
from stablesynth.models.encoder import ENCODERS
from stablesynth.presets import TaskPreset, get_preset
from stablesynth.training.stage1 import Stage1Config

#: Presets that score (clip, text) pairs with the K = 1 head instead of choosing an answer.
PAIR_PRESETS: tuple[str, ...] = ("msrvtt-mc", "msrvtt-ret")
#: Presets this module trains end to end.
SUPPORTED_PRESETS: tuple[str, ...] = (*QA_DATASETS, *PAIR_PRESETS)
RUN_CONFIG_FILE = "run_config.json"


class RealDataConfig(Config):
    """One real-data run; defaults come from the preset (see :func:`load_realdata_config`)."""

    preset: str = "msrvtt-qa"
    data_root: str = ""
    #: Where the annotation files are (default: data_root and its usual sub-folders).
    annotation_dir: str = ""
    #: Where videos/, YouTubeClips/ or gifs/ are (default: data_root).
    media_root: str = ""
    #: Pre-extracted frames instead of videos: one folder of images per clip, frames_dir/<clip name>/.
    frames_dir: str = ""
    seed: int = 0
    #: Encoder preset ("" = the preset's, allinone-ti for the paper's datasets).
    encoder: str = ""
    encoder_overrides: dict[str, Any] = Field(default_factory=dict)
    #: K of the dynamic layer (0 = the preset's, which gives the paper's bytes).
    num_classes: int = Field(0, ge=0)
    #: VideoDatasetConfig fields (num_frames, global_frames, device_by, n_devices); image size
    #: and text length follow the encoder.
    video: dict[str, Any] = Field(default_factory=dict)
    #: Frame sampling while training stage 1 (All-in-One: random); caches are always uniform.
    train_sampling: Literal["random", "uniform"] = "random"
    train_split: str = "train"
    test_split: str = "test"
    #: Use only the first N records of a split (0 = all), for small runs.
    max_train: int = Field(0, ge=0)
    max_test: int = Field(0, ge=0)
    #: Device ids held out of training, reported as "unseen".
    unseen_devices: list[int] = Field(default_factory=list)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    methods: list[str] = Field(default_factory=all_methods)
    #: Stage-2 settings for every method (e.g. epochs, batch_size); method_overrides win.
    stage2: dict[str, Any] = Field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Multiple choice / retrieval: sampled negative captions per training (video, caption) pair.
    negatives: int = Field(4, ge=1)
    #: Multiple choice: train on this JSON-lines file of MC items (clip_name, options, answer[, question]),
    #: videos under the media root, instead of MSRVTT retrieval's train pairs.
    train_from: str = ""
    eval_batch_size: int = Field(32, ge=1)
    shard_batches: int = Field(8, ge=1)
    num_workers: int = Field(0, ge=0)
    adapt_timing_repeats: int = Field(200, ge=1)

    def check(self) -> None:
        if self.preset not in SUPPORTED_PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is not trainable here (supported: "
                              f"{', '.join(SUPPORTED_PRESETS)})")
        if self.encoder and self.encoder not in ENCODERS:
            raise ConfigError(f"encoder: unknown encoder preset {self.encoder!r} (known: {', '.join(ENCODERS)})")
        require(not self.train_from or self.preset == "msrvtt-mc", "train_from",
                "only multiple choice (msrvtt-mc) trains from another annotation file")
        check_method_names(self.methods, self.method_overrides)
        for name in self.methods:
            try:
                self.method_config(name)
            except ConfigError as exc:
                raise ConfigError(f"method_overrides.{name}.{exc}") from None
        try:
            self.video_config()
        except ConfigError as exc:
            raise ConfigError(f"video.{exc}") from None

    @property
    def task_preset(self) -> TaskPreset:
        return get_preset(self.preset)

    @property
    def is_pair(self) -> bool:
        """Multiple choice or retrieval: one matching logit per (clip, text) row."""
        return self.task_preset.task in ("mc_qa", "retrieval")

    @property
    def encoder_name(self) -> str:
        return self.encoder or self.task_preset.encoder

    @property
    def label_count(self) -> int:
        return self.num_classes or self.task_preset.num_classes

    def method_config(self, name: str) -> MethodConfig:
        p = self.task_preset
        base = {"lr": p.stage2_lr, "epochs": p.stage2_epochs, "driver_dim": p.driver_dim, **self.stage2}
        if METHODS.get(name).multi_frame_upload:
            # DUET uploads 5 frames in the paper; a clip here has only num_frames decoded frames
            # (3 for All-in-One), so it gets all of them unless a config says otherwise.
            frames = int(self.video.get("num_frames", p.frames))
            base.setdefault("duet_frames", min(default_method_config(name).duet_frames, frames))
        return default_method_config(name, **{**base, **self.method_overrides.get(name, {})})

    def video_config(self, sampling: str = "uniform") -> VideoDatasetConfig:
        enc = ENCODERS.get(self.encoder_name).replace(**self.encoder_overrides)
        p = self.task_preset
        base = {"image_size": enc.image_size, "text_len": min(p.text_len, enc.max_text_len), "seed": self.seed}
        return VideoDatasetConfig.from_preset(p, **{**base, **self.video, "sampling": sampling})


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_realdata_config(preset: str | None = None, path: str | Path | None = None,
                         **overrides: Any) -> RealDataConfig:
    """The preset's paper hyper-parameters, then the config file, then ``overrides`` (e.g. data_root)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(Path(path))
    name = preset or data.get("preset") or "msrvtt-qa"
    if preset and data.get("preset") not in (None, preset):
        raise ConfigError(f"preset: the config file says {data['preset']!r} but --preset is {preset!r}")
    p = get_preset(name)
    base = {"preset": name, "stage1": {"lr": p.stage1_lr, "epochs": p.stage1_epochs}}
    merged = merge(merge(base, data), {k: v for k, v in overrides.items() if v is not None})
    try:
        return RealDataConfig.from_dict(merged)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
