"""The main job on the paper's real video datasets (DESIGN §6): the demo's stages, real clips.

``stablesynth train --preset msrvtt-qa --data-root DIR --out OUT`` reads the published
annotation files (:mod:`stablesynth.data.formats`), decodes the videos
(:mod:`stablesynth.data.video_dataset`), trains stage 1 on the train split, caches
per-frame features, trains every method in stage 2 and evaluates each on the test
split per device, writing the demo's ``results.json`` / ``report.md`` schema.
``stablesynth eval --checkpoint-dir OUT`` reloads the checkpoints, encodes the test
clips again from the videos and writes the same files (its accuracies equal train's).

Devices are the dataset's user grouping (the MSRVTT video category, else a stable hash
bucket of the video id: :mod:`stablesynth.data.video_dataset`). All devices are
"seen" unless ``unseen_devices`` holds some out of training. There is no per-device
fine-tuning oracle and no clean/shifted check here: those need the synthetic capture
profiles of the embedded benchmark, so results.json has ``oracle`` and ``informative``
set to null.

Multiple choice (``msrvtt-mc``) and retrieval (``msrvtt-ret``) score (clip, text) pairs
with the K = 1 head; each row is one pair, encoded together. Training is binary
cross-entropy per row (the logit s read as All-in-One's 2-way ITM logits (0, s), so the
methods' own cross-entropy needs no change). MSRVTT-MC publishes only a test file, so, as
in All-in-One, both train on MSRVTT retrieval's train (video, caption) pairs, each with
``negatives`` captions of other videos drawn from the seed (test videos are dropped from
training); ``train_from`` gives MC a JSON-lines file of MC items instead. MC predicts the
candidate with the highest logit (``mc_accuracy``). Retrieval scores every (caption,
video) pair of the test split (N² rows: fine for small sets, 10⁶ for 1k-A) and reports
VR@1/5/10 and TR@1/5/10 (``methods.<name>.retrieval``); its per-device "accuracy" is
text → video R@1 over the captions of the device's videos. The hypernetwork methods
upload one frame of the row's (candidate) video, encoded with the row's text; the
contrastive, variance and template modules use match / non-match as the two categories.

Hyper-parameters default to the preset (stage 1: AdamW lr 2e-5, polynomial decay, 10
epochs; stage 2: lr 1e-4, 40 epochs; driver 96, or 256 for retrieval); a config file
overrides any of them, e.g. the ``allinone-test`` encoder and a few clips for a CPU run.

Under ``torchrun`` stage 1 runs with DDP (each rank a DistributedSampler shard) and
the feature cache is written shard by shard across ranks; stage 2 and evaluation run
on cached features, on rank 0 only.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

import stablesynth.methods
from stablesynth.checkpoint import (
    CheckpointError,
    load_checkpoint,
)
from stablesynth.config import Config, ConfigError, require
from stablesynth.data.batch import FeatureBatch
from stablesynth.data.formats import (
    QA_DATASETS,
    AnswerVocab,
    DatasetFormatError,
    MCRecord,
    QARecord,
    RetrievalRecord,
    read_jsonl,
    read_msrvtt_categories,
    read_msrvtt_mc,
    read_msrvtt_retrieval,
    read_qa,
)
from stablesynth.data.tokenizer import load_tokenizer
from stablesynth.data.video_dataset import VideoDatasetConfig, VideoMCDataset, VideoQADataset, collate_clips
from stablesynth.evaluation.metrics import mc_accuracy, per_device_summary, retrieval_metrics, rows_to_candidates
from stablesynth.evaluation.report import SCHEMA_VERSION
from stablesynth.methods.base import METHODS, Method
from stablesynth.methods.config import default_method_config
from stablesynth.models.encoder import ENCODERS, create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.pipeline import ALL_METHODS, METHOD_LABELS, Run, _json_safe, _payload_rows, versions, write_outputs
from stablesynth.presets import TaskPreset, get_preset
from stablesynth.training.distributed import SINGLE, DistContext, shard_indices
from stablesynth.training.features import extract_features, load_features, module_fingerprint
from stablesynth.training.stage1 import Stage1Config, train_stage1

assert stablesynth.methods  # importing the package registers every method

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
    num_classes: int = 0
    #: VideoDatasetConfig fields (num_frames, global_frames, device_by, n_devices); image size
    #: and text length follow the encoder.
    video: dict[str, Any] = Field(default_factory=dict)
    #: Frame sampling while training stage 1 (All-in-One: random); caches are always uniform.
    train_sampling: str = "random"
    train_split: str = "train"
    test_split: str = "test"
    #: Use only the first N records of a split (0 = all), for small runs.
    max_train: int = 0
    max_test: int = 0
    #: Device ids held out of training, reported as "unseen".
    unseen_devices: list[int] = Field(default_factory=list)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    methods: list[str] = Field(default_factory=lambda: list(ALL_METHODS))
    #: Stage-2 settings for every method (e.g. epochs, batch_size); method_overrides win.
    stage2: dict[str, Any] = Field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Multiple choice / retrieval: sampled negative captions per training (video, caption) pair.
    negatives: int = 4
    #: Multiple choice: train on this JSON-lines file of MC items (clip_name, options, answer[, question]),
    #: videos under the media root, instead of MSRVTT retrieval's train pairs.
    train_from: str = ""
    eval_batch_size: int = 32
    shard_batches: int = 8
    num_workers: int = 0
    adapt_timing_repeats: int = 200

    def check(self) -> None:
        if self.preset not in SUPPORTED_PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is not trainable here (supported: "
                              f"{', '.join(SUPPORTED_PRESETS)})")
        if self.encoder and self.encoder not in ENCODERS:
            raise ConfigError(f"encoder: unknown encoder preset {self.encoder!r} (known: {', '.join(ENCODERS)})")
        require(self.num_classes >= 0, "num_classes", "must be >= 0 (0 = the preset's K)")
        require(self.train_sampling in ("random", "uniform"), "train_sampling", "must be 'random' or 'uniform'")
        require(self.max_train >= 0 and self.max_test >= 0, "max_train", "caps must be >= 0 (0 = no cap)")
        require(self.negatives >= 1, "negatives", "must be >= 1")
        require(not self.train_from or self.preset == "msrvtt-mc", "train_from",
                "only multiple choice (msrvtt-mc) trains from another annotation file")
        require(len(self.methods) > 0, "methods", "must name at least one method")
        for name in self.methods:
            if name not in METHODS:
                raise ConfigError(f"methods: unknown method {name!r} (known: {', '.join(METHODS.names())})")
        for name in self.method_overrides:
            if name not in METHODS:
                raise ConfigError(f"method_overrides: unknown method {name!r}")
        for name in self.methods:
            try:
                self.method_config(name)
            except ConfigError as exc:
                raise ConfigError(f"method_overrides.{name}.{exc}") from None
        try:
            self.video_config()
        except ConfigError as exc:
            raise ConfigError(f"video.{exc}") from None
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.shard_batches >= 1, "shard_batches", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(self.adapt_timing_repeats >= 1, "adapt_timing_repeats", "must be >= 1")

    # The pipeline's Run.costs reads these two names.
    @property
    def paper_preset(self) -> str:
        return self.preset

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

    def method_config(self, name: str):
        p = self.task_preset
        base = {"lr": p.stage2_lr, "epochs": p.stage2_epochs, "driver_dim": p.driver_dim, **self.stage2}
        if name == "duet":
            # DUET uploads 5 frames in the paper; a clip here has only num_frames decoded frames
            # (3 for All-in-One), so DUET gets all of them unless a config says otherwise.
            frames = int(self.video.get("num_frames", p.frames))
            base.setdefault("duet_frames", min(default_method_config("duet").duet_frames, frames))
        return default_method_config(name, **{**base, **self.method_overrides.get(name, {})})

    def video_config(self, sampling: str = "uniform") -> VideoDatasetConfig:
        enc = ENCODERS.get(self.encoder_name).replace(**self.encoder_overrides)
        p = self.task_preset
        base = {"image_size": enc.image_size, "text_len": min(p.text_len, enc.max_text_len), "seed": self.seed}
        return VideoDatasetConfig.from_preset(p, **{**base, **self.video, "sampling": sampling})


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_realdata_config(preset: str | None = None, path: str | Path | None = None,
                         **overrides: Any) -> RealDataConfig:
    """The preset's paper hyper-parameters, then the config file, then ``overrides`` (e.g. data_root)."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _raw_file(Path(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    name = preset or data.get("preset") or "msrvtt-qa"
    if preset and data.get("preset") not in (None, preset):
        raise ConfigError(f"preset: the config file says {data['preset']!r} but --preset is {preset!r}")
    p = get_preset(name)
    base = {"preset": name, "stage1": {"lr": p.stage1_lr, "epochs": p.stage1_epochs}}
    merged = _merge(_merge(base, data), {k: v for k, v in overrides.items() if v is not None})
    return RealDataConfig.from_dict(merged)


def _raw_file(path: Path) -> dict[str, Any]:
    # Only the keys the user wrote, so that preset defaults fill everything else.
    import tomllib

    import yaml

    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    return yaml.safe_load(text) or {}


# ---------------------------------------------------------------------------------------------
# clips


class ClipBatches(Sequence):
    """Batches of a clip dataset, decoded when indexed (so skipped batches cost nothing)."""

    def __init__(self, dataset: VideoQADataset, index_batches: list[list[int]]) -> None:
        self.dataset = dataset
        self.index_batches = index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return collate_clips([self.dataset[j] for j in self.index_batches[i]])


def _chunks(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    out = [indices[s:s + size] for s in range(0, len(indices), size)]
    if drop_last and len(out) > 1 and len(out[-1]) < size:
        out.pop()
    return out


def _records_digest(records: Sequence[QARecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.video_id}\t{r.question}\t{r.label}\t{r.media_path.name}\n".encode())
    return h.hexdigest()[:16]


def _dataset_digest(ds: VideoQADataset) -> str:
    if not isinstance(ds, VideoMCDataset):
        return _records_digest(ds.records)
    h = hashlib.sha256()
    for r in ds.items:
        h.update(f"{r.video_id}\t{r.question}\t{r.answer}\t{r.media_path.name}\t".encode())
        h.update("\x1f".join(r.options).encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# multiple choice and retrieval: (clip, text) pairs scored by the K = 1 head
#
# Every row is one (clip, text) pair, encoded together (the encoder fuses frame and text), and the
# head gives it one logit s. Training reads s as the two logits (0, s) of All-in-One's 2-way ITM
# head, so the methods' own cross-entropy over them is binary cross-entropy per row
# (−log σ(s) for a match, −log σ(−s) otherwise), in stage 1 and stage 2 alike; the device's dynamic
# layer stays 96 → 1. Prediction ranks the rows by s: the highest-scoring candidate of a
# multiple-choice item wins; retrieval ranks videos per caption and captions per video.


def _cap(items: list, n: int) -> list:
    return items[:n] if n else items


def negative_sampled_items(pairs: Sequence[RetrievalRecord], negatives: int, seed: int) -> list[MCRecord]:
    """Each (video, caption) pair as one item: its caption among ``negatives`` captions of other videos.

    A negative is never a caption of the pair's own video (the same sentence often
    describes several videos; it would be a positive labelled 0). The negatives and the
    right caption's position are drawn from ``seed`` and the pair's sample id, so every run
    (train and eval) builds the same items.
    """
    own: dict[str, set[str]] = {}
    for p in pairs:
        own.setdefault(p.video_id, set()).add(p.caption)
    items: list[MCRecord] = []
    for p in pairs:
        rng = np.random.default_rng([seed, p.sample_id])
        negs: list[str] = []
        for _ in range(1000 * negatives):
            other = pairs[int(rng.integers(len(pairs)))]
            if other.caption not in own[p.video_id]:
                negs.append(other.caption)
                if len(negs) == negatives:
                    break
        else:
            raise DatasetFormatError(f"training pairs: no negative caption for video {p.video_id!r} (every "
                                     "caption drawn describes it too; negatives need other videos' captions)")
        pos = int(rng.integers(negatives + 1))
        options = (*negs[:pos], p.caption, *negs[pos:])
        items.append(MCRecord(sample_id=len(items), video_id=p.video_id, media_path=p.media_path,
                              options=options, answer=pos, category=p.category))
    return items


def all_pairs_items(pairs: Sequence[RetrievalRecord]) -> list[MCRecord]:
    """Retrieval test: item v = video v with every test caption as a candidate (caption v is its own)."""
    captions = tuple(p.caption for p in pairs)
    return [MCRecord(sample_id=i, video_id=p.video_id, media_path=p.media_path, options=captions, answer=i,
                     category=p.category) for i, p in enumerate(pairs)]


def read_mc_items(path: Path, media_root: Path, annotation_dir: Path) -> list[MCRecord]:
    """Multiple-choice items in MSRVTT-MC's JSON-lines format from any file (``train_from``)."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: train_from file not found")
    cats = read_msrvtt_categories(annotation_dir)
    items: list[MCRecord] = []
    for n, o in read_jsonl(path):
        clip, options, answer = o.get("clip_name"), o.get("options"), o.get("answer")
        if not isinstance(clip, str) or not isinstance(options, list) or len(options) < 2 \
                or not all(isinstance(x, str) for x in options):
            raise DatasetFormatError(f"{path}:{n}: needs 'clip_name' and 'options' (>= 2 strings)")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise DatasetFormatError(f"{path}:{n}: 'answer' must be an index into 'options', got {answer!r}")
        question = o.get("question", "")
        items.append(MCRecord(sample_id=len(items), video_id=clip,
                              media_path=media_root / "videos" / "all" / f"{clip}.mp4", options=tuple(options),
                              answer=answer, question=question if isinstance(question, str) else "",
                              category=cats.get(clip)))
    return items


def _two_logits(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(s), s], dim=-1)


class PairModel(GlobalModel):
    """Stage 1 for pair tasks: the K = 1 logit s as ITM logits (0, s), so stage 1's CE is binary CE."""

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _two_logits(super().forward(batch))


class _PairLogits:
    """Mixed into a method: its device step returns (0, s) for the single generated logit s."""

    def predict(self, f_g: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _two_logits(super().predict(f_g, params))  # type: ignore[misc]


_PAIR_CLASSES: dict[type, type] = {}


def pair_method_class(cls: type[Method]) -> type[Method]:
    """``cls`` with :class:`_PairLogits` mixed in (same parameters, so checkpoints are ``cls``'s)."""
    if cls not in _PAIR_CLASSES:
        _PAIR_CLASSES[cls] = type(f"Pair{cls.__name__}", (_PairLogits, cls), {})
    return _PAIR_CLASSES[cls]


def pair_scores(method: Method, data: FeatureBatch, batch_size: int, mode: str) -> torch.Tensor:
    """The matching score s of every row, per sample (own upload) or per session (a device's first row)."""
    method.eval()
    with torch.inference_mode():
        scores = torch.empty(len(data), dtype=torch.float64)
        if mode == "per_sample":
            for start in range(0, len(data), batch_size):
                lg = method(data.index(slice(start, start + batch_size)))
                scores[start:start + lg.shape[0]] = (lg[:, 1] - lg[:, 0]).double()
        else:
            for d in data.device.unique().tolist():
                idx = torch.nonzero(data.device == d).flatten()
                first = data.index(idx[:1])
                shared = {k: v[0] for k, v in method.adapt(method.upload(first)).items()}
                lg = method.predict(data.index(idx).f_g, shared)
                scores[idx] = (lg[:, 1] - lg[:, 0]).double()
    return scores


class RealDataRun(Run):
    """The demo's stages (:class:`stablesynth.pipeline.Run`) over a real video QA dataset.

    ``evaluate`` and ``costs`` are the demo's own; the data, stage 1, the caches and the
    method checkpoints are built here. ``mode="eval"`` loads finished checkpoints
    from ``out`` instead of training.
    """

    def __init__(self, cfg: RealDataConfig, out: Path, log: Callable[[str], None] = print,
                 dist: DistContext | None = None, mode: str = "train", features_dir: Path | None = None) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not cfg.data_root:
            raise ConfigError("data_root: no dataset folder given (--data-root)")
        self.cfg = cfg  # type: ignore[assignment]
        self.out = Path(out)
        self.mode = mode
        self.require_checkpoints = mode == "eval"
        self.model_prefix = cfg.preset
        self.dist = dist or SINGLE
        self.log = self.dist.log(log)
        self.reuse = True
        self.features_dir = features_dir or self.out / "features"
        self.timings: dict[str, float] = {}
        self.features: dict[str, FeatureBatch] = {}
        self.stage1_info: dict[str, Any] = {}
        self.rows: dict[str, dict[str, torch.Tensor]] = {}
        self.K = cfg.label_count
        t = time.perf_counter()
        self._read_data()
        self.timings["data"] = time.perf_counter() - t
        torch.manual_seed(cfg.seed)
        encoder = create_model(cfg.encoder_name, **cfg.encoder_overrides)
        self.model = (PairModel if cfg.is_pair else GlobalModel)(encoder, self.K, dropout=cfg.stage1.head_dropout)
        # The untrained model is F-linear's frozen encoder and starting head (rebuilt from the seed in eval).
        self.initial = copy.deepcopy(self.model)

    def _read_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.cfg.annotation_dir:
            kw["annotation_dir"] = self.cfg.annotation_dir
        if self.cfg.media_root:
            kw["media_root"] = self.cfg.media_root
        return kw

    def _qa_records(self) -> dict[str, list]:
        cfg = self.cfg
        kw = {"num_classes": self.K, **self._read_kwargs()}
        train = read_qa(cfg.preset, cfg.data_root, cfg.train_split, **kw)
        # The test split is labelled with the train vocabulary (All-in-One's ans2label is the train one).
        test = read_qa(cfg.preset, cfg.data_root, cfg.test_split, vocab=train.vocab, **kw)
        self.vocab = train.vocab
        self.train_source = f"{cfg.preset} {cfg.train_split} split"
        return {"history": _cap(train.records, cfg.max_train), "realtime": _cap(test.records, cfg.max_test)}

    def _pair_items(self) -> dict[str, list]:
        """Train items (positive + sampled negatives) and test items (MC items, or all test pairs)."""
        cfg = self.cfg
        kw = self._read_kwargs()
        self.vocab = AnswerVocab({"match": 0}, source="pair score: one matching logit per (clip, text) row")
        if cfg.preset == "msrvtt-mc":
            test = _cap(read_msrvtt_mc(cfg.data_root, num_candidates=cfg.task_preset.num_candidates, **kw),
                        cfg.max_test)
        else:
            test = all_pairs_items(_cap(read_msrvtt_retrieval(cfg.data_root, cfg.test_split, **kw), cfg.max_test))
        if cfg.train_from:
            ann = Path(cfg.annotation_dir or cfg.data_root)
            train = read_mc_items(Path(cfg.train_from), Path(cfg.media_root or cfg.data_root), ann)
            self.train_source = f"multiple-choice items of {cfg.train_from}"
        else:
            try:
                pairs = read_msrvtt_retrieval(cfg.data_root, cfg.train_split, **kw)
            except DatasetFormatError as exc:
                if cfg.preset != "msrvtt-mc":
                    raise
                raise DatasetFormatError(
                    f"msrvtt-mc: MSRVTT-MC publishes only a test file, so training needs (video, caption) "
                    f"pairs: put MSRVTT retrieval's MSR_VTT.json and train_list_jsfusion.txt under the data "
                    f"root, or give train_from: a JSON-lines file of MC items ({exc})") from None
            # Test videos never train (MSRVTT's 9k train list and 1k-A test list are disjoint already).
            test_videos = {r.video_id for r in test}
            pairs = _cap([p for p in pairs if p.video_id not in test_videos], cfg.max_train)
            train = negative_sampled_items(pairs, cfg.negatives, cfg.seed)
            self.train_source = (f"MSRVTT retrieval {cfg.train_split} pairs, each with {cfg.negatives} "
                                 "sampled negative captions of other videos")
        return {"history": _cap(train, cfg.max_train), "realtime": test}

    def _read_data(self) -> None:
        cfg = self.cfg
        records = self._pair_items() if cfg.is_pair else self._qa_records()
        for key in records:
            recs = records[key]
            if cfg.frames_dir:
                recs = [dataclasses.replace(r, media_path=Path(cfg.frames_dir) / r.media_path.stem) for r in recs]
            if not recs:
                raise ConfigError(f"{key}: the {cfg.preset} split has no records")
            records[key] = recs
        encode = load_tokenizer().encode
        dataset = VideoMCDataset if cfg.is_pair else VideoQADataset
        self.datasets = {k: dataset(v, encode, cfg.video_config("uniform")) for k, v in records.items()}
        self.train_dataset = dataset(records["history"], encode, cfg.video_config(cfg.train_sampling))
        devices = sorted(set(self.datasets["history"].devices) | set(self.datasets["realtime"].devices))
        unseen = set(cfg.unseen_devices)
        self.device_ids = devices
        self.seen = {d for d in self.datasets["history"].devices if d not in unseen}
        if not self.seen:
            raise ConfigError("unseen_devices: every device with training clips is held out")
        # Stage 1 and stage 2 train only on seen devices' clips.
        self.train_rows = [i for i, d in enumerate(self.train_dataset.devices) if d in self.seen]
        if cfg.is_pair:
            self.n_out_of_vocab = {k: 0 for k in records}
            self.items = {k: len(v) for k, v in records.items()}
            self.log(f"{cfg.preset}: {self.items['history']} train items ({len(self.datasets['history'])} "
                     f"rows) / {self.items['realtime']} test items ({len(self.datasets['realtime'])} rows), "
                     f"{len(devices)} devices ({len(self.seen)} seen), K = {self.K}; training on "
                     f"{self.train_source}")
            return
        self.n_out_of_vocab = {k: sum(r.label < 0 for r in v) for k, v in records.items()}
        self.log(f"{cfg.preset}: {len(records['history'])} train / {len(records['realtime'])} test clips, "
                 f"{len(devices)} devices ({len(self.seen)} seen), K = {self.K}, vocabulary "
                 f"{len(self.vocab)} ({self.vocab.source})")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key, ds in self.datasets.items():
            h.update(f"{key}:{_dataset_digest(ds)}".encode())
        h.update(json.dumps(self.cfg.video_config().to_dict(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    # -- stage 1 -----------------------------------------------------------------------------

    def stage1(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        ctx = self.dist
        if cfg.stage1.batch_size % ctx.world_size:
            raise ConfigError(f"stage1.batch_size: {cfg.stage1.batch_size} is not a multiple of the "
                              f"{ctx.world_size} processes")
        per_rank = cfg.stage1.batch_size // ctx.world_size
        rows = self.train_rows
        ds = self.train_dataset

        def loader(epoch: int):
            ds.set_epoch(epoch)
            mine = shard_indices(len(rows), ctx.rank, ctx.world_size, seed=cfg.seed * 1000, epoch=epoch)
            batches = _chunks([rows[i] for i in mine], per_rank, drop_last=True)
            if cfg.num_workers:
                return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate_clips,
                                                   num_workers=cfg.num_workers)
            return ClipBatches(ds, batches)

        self.stage1_info = train_stage1(
            self.model, loader, cfg.stage1, self.out / "stage1", cfg.seed,
            manifest_extra={"encoder": cfg.encoder_name, "encoder_overrides": cfg.encoder_overrides,
                            "dataset": cfg.preset, "data": self.fingerprint(), "num_classes": self.K},
            log=self.log, dist=ctx,
        )
        self.stage1_info["seconds"] = time.perf_counter() - t
        self.timings["stage1"] = self.stage1_info["seconds"]

    def load_stage1(self) -> None:
        """Eval mode: the trained stage-1 model from ``out/stage1``."""
        tensors, manifest = load_checkpoint(self.out / "stage1", expect_kind="stage1")
        if int(manifest.get("num_classes", self.K)) != self.K:
            raise CheckpointError(f"{self.out / 'stage1'} has K = {manifest.get('num_classes')}, the config {self.K}")
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.stage1_info = {"history": manifest.get("history", []), "seconds": 0.0}

    # -- features ----------------------------------------------------------------------------

    def _cache(self, tag: str, encoder: torch.nn.Module, split: str) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ds = self.datasets[split]
        batches = _chunks(list(range(len(ds))), cfg.eval_batch_size, drop_last=False)
        key = {"encoder": module_fingerprint(encoder), "dataset": cfg.preset, "split": split,
               "records": _dataset_digest(ds), "clips": len(ds), "video": ds.cfg.to_dict()}
        path = extract_features(encoder, lambda: ClipBatches(ds, batches), len(batches),
                                self.features_dir / f"{tag}-{split}", key, shard_batches=cfg.shard_batches,
                                desc=f"features {tag}/{split}", dist=self.dist)
        return load_features(path)

    def cache_features(self, splits: Sequence[str] = ("history", "realtime")) -> None:
        t = time.perf_counter()
        for split in splits:
            self.rows[split] = self._cache("trained", self.model.encoder, split)
        if "f_linear" in self.cfg.methods:
            for split in splits:
                self.rows[f"init_{split}"] = self._cache("init", self.initial.encoder, split)
        self.timings["features"] = time.perf_counter() - t

    # -- stage 2 -----------------------------------------------------------------------------

    def answer_names(self) -> list[str]:
        return self.vocab.labels

    def num_categories(self, kind: str) -> int:
        return {"question_type": 4, "device": max(self.device_ids) + 1, "answer": 2}[kind]

    def method_class(self, name: str) -> type[Method]:
        cls = METHODS.get(name)
        return pair_method_class(cls) if self.cfg.is_pair else cls

    def build_method(self, name: str, num_classes: int | None = None,
                     overrides: dict[str, Any] | None = None) -> Method:
        if self.cfg.is_pair:
            # A pair task's "answer" is match / non-match: two categories for K = 1.
            mcfg = self.cfg.method_config(name)
            if mcfg.num_categories is None and mcfg.category == "answer":
                overrides = {"num_categories": 2, **(overrides or {})}
        return super().build_method(name, num_classes, overrides)

    # -- multiple choice / retrieval evaluation ------------------------------------------------

    def evaluate_pairs(self, method: Method, realtime: FeatureBatch) -> tuple[dict[str, Any], dict[str, Any]]:
        """Score every test row, gather the scores per item, and return (accuracy blocks, task metrics).

        Multiple choice: an item is right when its correct candidate has the highest score.
        Retrieval: the [videos × captions] score matrix gives VR@K / TR@K; the per-device
        "accuracy" is text → video R@1 over the captions of the device's videos.
        """
        ds = self.datasets["realtime"]
        if len(realtime) != len(ds):
            raise RuntimeError(f"{len(realtime)} cached test rows for {len(ds)} dataset rows")
        n_cand = len(ds.items[0].options)
        item_device = torch.tensor(ds.item_devices)
        blocks: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        for mode in ("per_sample", "per_session"):
            scores = pair_scores(method, realtime, self.cfg.eval_batch_size, mode)
            matrix = rows_to_candidates(scores, ds.row_group, ds.row_candidate, n_cand)  # [items, candidates]
            if self.cfg.task_preset.task == "retrieval":
                sim = matrix.T  # [captions, videos]; caption i belongs to video i
                own = sim.diagonal().unsqueeze(1)
                hits = ((sim >= own).sum(dim=1) - 1) < 1  # ties ranked against the caption, as recall_at_k
                metrics[mode] = retrieval_metrics(sim)
            else:
                answers = ds.answers
                hits = matrix.argmax(dim=1) == answers
                metrics[mode] = mc_accuracy(matrix, answers)
            per_dev = {int(d): float(hits[item_device == d].double().mean()) for d in item_device.unique().tolist()}
            summary = per_device_summary(per_dev, self.seen)
            blocks[mode] = {"per_device": {str(k): v for k, v in sorted(per_dev.items())},
                            **{g: {k: summary[g][k] for k in ("mean", "worst", "std", "n")}
                               for g in ("seen", "unseen", "all")}}
        return blocks, metrics


# ---------------------------------------------------------------------------------------------
# the job


def _pair_benchmark(run: RealDataRun) -> dict[str, Any]:
    cfg = run.cfg
    ds = run.datasets["realtime"]
    n_cand = len(ds.items[0].options)
    common = {
        "task": cfg.task_preset.task,
        "items": run.items,
        "candidates": n_cand,
        "train_data": run.train_source,
        "loss": ("binary cross-entropy per (clip, text) row: the K = 1 logit s read as the 2-way ITM "
                 "logits (0, s), in stage 1 and stage 2"),
    }
    if cfg.task_preset.task == "retrieval":
        n = len(ds.items)
        return {**common, "accuracy_convention": (
            f"per device: text → video R@1 over the captions of the device's videos, each ranked against all "
            f"{n} test videos (ties count against it); methods.<name>.retrieval has VR@1/5/10 and TR@1/5/10 "
            f"over the whole matrix"),
            "scoring_cost": (f"every (caption, video) pair is encoded and scored: {n} × {n} = {n * n} rows × "
                             f"{ds.cfg.num_frames} frames through the encoder (MSRVTT 1k-A: 10^6 pairs)")}
    return {**common, "accuracy_convention": (
        f"multiple choice: an item is right when its correct candidate has the highest of the {n_cand} logits "
        f"(ties: the first candidate); per-device means over the device's items, methods.<name>.mc_accuracy "
        f"over all items")}


def _results(run: RealDataRun, methods: dict[str, Any], t0: float, command: str) -> dict[str, Any]:
    cfg = run.cfg
    preset = cfg.task_preset
    return _empty_groups_nan(_json_safe({
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t0,
        "versions": versions(),
        "seed": cfg.seed,
        "command": command,
        "config": cfg.to_dict(),
        "benchmark": {
            "dataset": cfg.preset,
            "num_classes": run.K,
            "answers": run.vocab.labels,
            "vocabulary": run.vocab.source,
            "devices": [{"id": d, "seen": d in run.seen} for d in run.device_ids],
            "device_grouping": run.datasets["realtime"].cfg.device_by,
            "counts": {k: len(ds) for k, ds in run.datasets.items()},
            "out_of_vocabulary": run.n_out_of_vocab,
            "fingerprint": run.fingerprint(),
            "accuracy_convention": (
                f"top-1 over K = {run.K} answers; test questions whose answer is outside the train "
                f"vocabulary ({run.n_out_of_vocab['realtime']} here) leave the denominator "
                "(All-in-One's convention)"),
            **(_pair_benchmark(run) if cfg.is_pair else {}),
        },
        "stage1": {"history": run.stage1_info.get("history", []), "seconds": run.stage1_info.get("seconds", 0.0)},
        "timings": run.timings,
        # Both need the embedded benchmark's synthetic capture profiles; real clips have none.
        "informative": None,
        "oracle": None,
        "methods": methods,
        "paper": {"preset": cfg.preset, **preset.paper.to_dict()},
        "payload": _payload_rows(),
    }))


def _empty_groups_nan(results: dict[str, Any]) -> dict[str, Any]:
    """Statistics of a device group with no devices (n = 0) as NaN, which report.md prints as "—".

    ``_json_safe`` turns NaN into null, which validate_results rejects; with every device
    seen (the default here) the "unseen" group is empty, so its statistics stay NaN.
    """
    for m in results["methods"].values():
        for block in m["accuracy"].values():
            for group in ("seen", "unseen", "all"):
                if block[group]["n"] == 0:
                    block[group].update({k: math.nan for k in ("mean", "worst", "std")})
    return results


def _evaluate_all(run: RealDataRun, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in run.cfg.methods:
        method, train_seconds = run.train_or_load(name)
        rt = run.data("init_realtime" if name == "f_linear" else "realtime", method.cfg.category)
        entry = {"label": METHOD_LABELS.get(name, name), "adaptive": bool(method.adaptive),
                 "train_seconds": train_seconds, "config": method.cfg.to_dict()}
        if run.cfg.is_pair:
            entry["accuracy"], metrics = run.evaluate_pairs(method, rt)
            key = "retrieval" if run.cfg.task_preset.task == "retrieval" else "mc_accuracy"
            entry[key] = metrics["per_sample"]
            entry[f"{key}_per_session"] = metrics["per_session"]
        else:
            entry["accuracy"] = run.evaluate(method, rt)
        entry.update(run.costs(name, method, rt))
        out[name] = entry
        acc = entry["accuracy"]["per_sample"]["all"]
        extra = ""
        if "retrieval" in entry:
            extra = "  " + " ".join(f"{k} {100 * v:.1f}" for k, v in entry["retrieval"].items())
        elif "mc_accuracy" in entry:
            extra = f"  MC accuracy {100 * entry['mc_accuracy']:.1f}"
        log(f"{entry['label']:>15}: mean {100 * acc['mean']:.1f}  worst {100 * acc['worst']:.1f}  "
            f"std {100 * acc['std']:.1f} over {acc['n']} devices{extra}")
    return out


def pair_report(results: Mapping[str, Any]) -> str:
    """The report.md section of multiple choice (paper Table 6) or retrieval (paper Table 3)."""
    bench = results["benchmark"]
    methods = results["methods"]
    paper = results.get("paper", {})
    lines = [""]
    if bench.get("task") == "retrieval":
        keys = ("VR@1", "VR@5", "VR@10", "TR@1", "TR@5", "TR@10")
        lines += ["## Retrieval (the paper's Table 3 layout)", "",
                  f"{bench['items']['realtime']} test videos, one caption each; {bench['scoring_cost']}. "
                  f"Training: {bench['train_data']}; {bench['loss']}. Paper values in brackets.", "",
                  "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in methods.items():
            p = paper.get("retrieval", {}).get(name, {})
            cells = [f"{100 * m['retrieval'][k]:.1f}" + (f" ({p[k]})" if k in p else "") for k in keys]
            lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    else:
        lines += ["## Multiple choice (the paper's Table 6 layout)", "",
                  f"{bench['items']['realtime']} test items, {bench['candidates']} candidates each. Training: "
                  f"{bench['train_data']}; {bench['loss']}.", "",
                  "| method | accuracy, per sample | per session | paper |", "|---|---|---|---|"]
        for name, m in methods.items():
            p = paper.get("accuracy", {}).get(name)
            lines.append(f"| {m['label']} | {100 * m['mc_accuracy']:.1f} | {100 * m['mc_accuracy_per_session']:.1f} "
                         f"| {p if p is not None else '—'} |")
    return "\n".join(lines) + "\n"


def _write(results: dict[str, Any], out: Path) -> None:
    write_outputs(results, out)
    if "task" in results["benchmark"]:
        with open(out / "report.md", "a") as f:
            f.write(pair_report(results))


def train_realdata(cfg: RealDataConfig, out: Path, log: Callable[[str], None] = print,
                   dist: DistContext | None = None) -> dict[str, Any] | None:
    """Stage 1, caches, stage 2, evaluation; writes results.json and report.md (rank 0 returns them)."""
    t0 = time.perf_counter()
    ctx = dist or SINGLE
    out = Path(out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    ctx.barrier()
    run = RealDataRun(cfg, out, log=log, dist=ctx)
    run.stage1()
    run.cache_features()
    if not ctx.is_main:
        return None
    results = _results(run, _evaluate_all(run, run.log), t0, "train")
    _write(results, out)
    run.log(f"wrote {out / 'results.json'} and {out / 'report.md'} in {time.perf_counter() - t0:.0f} s")
    return results


def eval_realdata(checkpoint_dir: Path, out: Path | None = None, log: Callable[[str], None] = print,
                  **overrides: Any) -> dict[str, Any]:
    """Reload a finished ``train`` run, encode the test clips again and evaluate every method.

    ``overrides`` replace fields of the saved config (e.g. ``data_root`` when the data moved).
    """
    t0 = time.perf_counter()
    checkpoint_dir = Path(checkpoint_dir)
    saved = checkpoint_dir / RUN_CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} not found: is {checkpoint_dir} the --out of `stablesynth train`?")
    data = _merge(json.loads(saved.read_text()), {k: v for k, v in overrides.items() if v is not None})
    cfg = RealDataConfig.from_dict(data)
    out = Path(out) if out is not None else checkpoint_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    run = RealDataRun(cfg, checkpoint_dir, log=log, mode="eval", features_dir=out / "features")
    run.load_stage1()
    run.cache_features(splits=("realtime",))
    results = _results(run, _evaluate_all(run, log), t0, "eval")
    _write(results, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def accuracy_table(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Just the accuracy blocks of every method (what train and eval must agree on)."""
    return {name: m["accuracy"] for name, m in results["methods"].items()}


__all__ = [
    "PAIR_PRESETS",
    "SUPPORTED_PRESETS",
    "RealDataConfig",
    "RealDataRun",
    "accuracy_table",
    "eval_realdata",
    "load_realdata_config",
    "train_realdata",
]
