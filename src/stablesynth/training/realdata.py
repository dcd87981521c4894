"""The main job on the paper's real video QA datasets (DESIGN §6): the demo's stages, real clips.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import stablesynth.methods
from stablesynth.config import Config, ConfigError, require
from stablesynth.data.batch import FeatureBatch
from stablesynth.data.formats import QA_DATASETS, QARecord, read_qa
from stablesynth.data.tokenizer import load_tokenizer
from stablesynth.data.video_dataset import VideoDatasetConfig, VideoQADataset, collate_clips
from stablesynth.evaluation.report import SCHEMA_VERSION
from stablesynth.methods.base import METHODS, Method
from stablesynth.methods.config import default_method_config
from stablesynth.models.encoder import ENCODERS, create_model
from stablesynth.pipeline import ALL_METHODS, METHOD_LABELS, Run, _json_safe, _payload_rows, versions, write_outputs
from stablesynth.presets import TaskPreset, get_preset
from stablesynth.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_module_state,
    read_manifest,
    save_module,
)
from stablesynth.training.distributed import SINGLE, DistContext, shard_indices
from stablesynth.training.features import extract_features, load_features, module_fingerprint
from stablesynth.training.stage1 import GlobalModel, Stage1Config, train_stage1
from stablesynth.training.stage2 import train_method

assert stablesynth.methods  # importing the package registers every method

#: Presets this module trains end to end (multiple choice and retrieval score pairs, not answers).
SUPPORTED_PRESETS: tuple[str, ...] = QA_DATASETS
RUN_CONFIG_FILE = "run_config.json"


@dataclass
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
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    #: K of the dynamic layer (0 = the preset's, which gives the paper's bytes).
    num_classes: int = 0
    #: VideoDatasetConfig fields (num_frames, global_frames, device_by, n_devices); image size
    #: and text length follow the encoder.
    video: dict[str, Any] = field(default_factory=dict)
    #: Frame sampling while training stage 1 (All-in-One: random); caches are always uniform.
    train_sampling: str = "random"
    train_split: str = "train"
    test_split: str = "test"
    #: Use only the first N records of a split (0 = all), for small runs.
    max_train: int = 0
    max_test: int = 0
    #: Device ids held out of training, reported as "unseen".
    unseen_devices: list[int] = field(default_factory=list)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    #: Stage-2 settings for every method (e.g. epochs, batch_size); method_overrides win.
    stage2: dict[str, Any] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_batch_size: int = 32
    shard_batches: int = 8
    num_workers: int = 0
    adapt_timing_repeats: int = 200

    def validate(self) -> None:
        if self.preset not in SUPPORTED_PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is not trainable here (supported: "
                              f"{', '.join(SUPPORTED_PRESETS)})")
        if self.encoder and self.encoder not in ENCODERS:
            raise ConfigError(f"encoder: unknown encoder preset {self.encoder!r} (known: {', '.join(ENCODERS)})")
        require(self.num_classes >= 0, "num_classes", "must be >= 0 (0 = the preset's K)")
        require(self.train_sampling in ("random", "uniform"), "train_sampling", "must be 'random' or 'uniform'")
        require(self.max_train >= 0 and self.max_test >= 0, "max_train", "caps must be >= 0 (0 = no cap)")
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
        self.model = GlobalModel(encoder, self.K, dropout=cfg.stage1.head_dropout)
        # The untrained model is F-linear's frozen encoder and starting head (rebuilt from the seed in eval).
        self.initial = copy.deepcopy(self.model)

    def _read_data(self) -> None:
        cfg = self.cfg
        kw: dict[str, Any] = {"num_classes": self.K}
        if cfg.annotation_dir:
            kw["annotation_dir"] = cfg.annotation_dir
        if cfg.media_root:
            kw["media_root"] = cfg.media_root
        train = read_qa(cfg.preset, cfg.data_root, cfg.train_split, **kw)
        # The test split is labelled with the train vocabulary (All-in-One's ans2label is the train one).
        test = read_qa(cfg.preset, cfg.data_root, cfg.test_split, vocab=train.vocab, **kw)
        self.vocab = train.vocab
        records = {"history": train.records, "realtime": test.records}
        caps = {"history": cfg.max_train, "realtime": cfg.max_test}
        for key in records:
            recs = records[key][: caps[key]] if caps[key] else records[key]
            if cfg.frames_dir:
                recs = [dataclasses.replace(r, media_path=Path(cfg.frames_dir) / r.media_path.stem) for r in recs]
            if not recs:
                raise ConfigError(f"{key}: the {cfg.preset} split has no records")
            records[key] = recs
        encode = load_tokenizer().encode
        self.datasets = {k: VideoQADataset(v, encode, cfg.video_config("uniform")) for k, v in records.items()}
        self.train_dataset = VideoQADataset(records["history"], encode, cfg.video_config(cfg.train_sampling))
        devices = sorted(set(self.datasets["history"].devices) | set(self.datasets["realtime"].devices))
        unseen = set(cfg.unseen_devices)
        self.device_ids = devices
        self.seen = {d for d in self.datasets["history"].devices if d not in unseen}
        if not self.seen:
            raise ConfigError("unseen_devices: every device with training clips is held out")
        # Stage 1 and stage 2 train only on seen devices' clips.
        self.train_rows = [i for i, d in enumerate(self.train_dataset.devices) if d in self.seen]
        self.n_out_of_vocab = {k: sum(r.label < 0 for r in v) for k, v in records.items()}
        self.log(f"{cfg.preset}: {len(records['history'])} train / {len(records['realtime'])} test clips, "
                 f"{len(devices)} devices ({len(self.seen)} seen), K = {self.K}, vocabulary "
                 f"{len(self.vocab)} ({self.vocab.source})")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key, ds in self.datasets.items():
            h.update(f"{key}:{_records_digest(ds.records)}".encode())
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
               "records": _records_digest(ds.records), "clips": len(ds), "video": ds.cfg.to_dict()}
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

    def build_method(self, name: str, num_classes: int | None = None,
                     overrides: dict[str, Any] | None = None) -> Method:
        mcfg = self.cfg.method_config(name)
        if overrides:
            mcfg = mcfg.replace(**overrides)
        if mcfg.category != "answer" and mcfg.num_categories is None:
            counts = {"question_type": 4, "device": max(self.device_ids) + 1}
            mcfg = mcfg.replace(num_categories=counts[mcfg.category])
        method = METHODS.get(name)(mcfg, num_classes or self.K)
        if num_classes is None:
            src = self.initial if name == "f_linear" else self.model
            method.init_from_head(src.static, src.classifier.weight.detach(), src.classifier.bias.detach())
        return method

    def train_or_load(self, name: str) -> tuple[Method, float]:
        method = self.build_method(name)
        mcfg = method.cfg
        ckpt = self.out / "methods" / name
        stage1_sha = read_manifest(self.out / "stage1")["sha256"]
        if (ckpt / "manifest.json").exists():
            try:
                manifest = read_manifest(ckpt)
                if manifest.get("config") == mcfg.to_dict() and manifest.get("stage1_sha256") == stage1_sha:
                    load_module_state(ckpt, method, expect_kind="method")
                    self.log(f"stage 2 {name}: using {ckpt}")
                    return method, float(manifest.get("train_seconds", 0.0))
            except CheckpointError as exc:
                if self.mode == "eval":
                    raise
                self.log(f"stage 2 {name}: not reusing {ckpt} ({exc})")
        if self.mode == "eval":
            raise CheckpointError(f"{ckpt}: no checkpoint of {name} made by this run's stage 1 and config")
        if method.trains_in_stage2:
            data = self.data("init_history" if name == "f_linear" else "history", mcfg.category, devices="seen")
            info = train_method(method, data, mcfg.epochs, mcfg.batch_size, mcfg.lr, mcfg.weight_decay,
                                seed=self.cfg.seed, desc=f"stage 2 {name}")
            train_seconds = info["seconds"]
            self.log(f"stage 2 {name}: {info['steps']} steps in {train_seconds:.1f} s")
        else:
            train_seconds = float(self.stage1_info.get("seconds", 0.0))
        save_module(ckpt, method, {
            "kind": "method", "method": name, "config": mcfg.to_dict(), "num_classes": self.K,
            "model_id": f"{self.cfg.preset}-{name}", "model_version": stage1_sha[:12],
            "stage1_sha256": stage1_sha, "train_seconds": train_seconds, "answers": self.vocab.labels,
        })
        return method, train_seconds


# ---------------------------------------------------------------------------------------------
# the job


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
        entry["accuracy"] = run.evaluate(method, rt)
        entry.update(run.costs(name, method, rt))
        out[name] = entry
        acc = entry["accuracy"]["per_sample"]["all"]
        log(f"{entry['label']:>15}: mean {100 * acc['mean']:.1f}  worst {100 * acc['worst']:.1f}  "
            f"std {100 * acc['std']:.1f} over {acc['n']} devices")
    return out


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
    write_outputs(results, out)
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
    write_outputs(results, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def accuracy_table(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Just the accuracy blocks of every method (what train and eval must agree on)."""
    return {name: m["accuracy"] for name, m in results["methods"].items()}


__all__ = [
    "SUPPORTED_PRESETS",
    "RealDataConfig",
    "RealDataRun",
    "accuracy_table",
    "eval_realdata",
    "load_realdata_config",
    "train_realdata",
]
