"""The main job on the paper's real video datasets (DESIGN §6): the demo's stages, real clips.

``stablesynth train --preset msrvtt-qa --data-root DIR --out OUT`` reads the published
annotation files (:mod:`stablesynth.data.qa_formats`, :mod:`stablesynth.data.msrvtt_formats`),
decodes the videos (:mod:`stablesynth.data.video_dataset`), trains stage 1 on the train split, caches
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
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stablesynth.accelerator import configure_backends
from stablesynth.checkpoint import CheckpointError, load_checkpoint
from stablesynth.config import ConfigError
from stablesynth.data.annotation_files import DatasetFormatError
from stablesynth.data.annotation_records import AnswerVocab
from stablesynth.data.msrvtt_formats import read_msrvtt_mc, read_msrvtt_retrieval
from stablesynth.data.qa_formats import read_qa
from stablesynth.data.tokenizer import load_tokenizer
from stablesynth.data.video_dataset import VideoMCDataset, VideoQADataset, collate_clips
from stablesynth.experiment.realdata.config import RUN_CONFIG_FILE, RealDataConfig, merge
from stablesynth.experiment.realdata.pairs import (
    ClipBatches,
    _cap,
    _chunks,
    _dataset_digest,
    all_pairs_items,
    evaluate_pairs,
    negative_sampled_items,
    read_mc_items,
)
from stablesynth.experiment.results import json_safe, log_accuracy, method_entry, results_skeleton, write_outputs
from stablesynth.experiment.workspace import Workspace
from stablesynth.files import atomic_write_json
from stablesynth.methods import METHODS, Method, MethodConfig
from stablesynth.methods.pairs import PairModel, pair_method_class
from stablesynth.models.encoder import create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.distributed import SINGLE, DistContext, shard_indices, training_device
from stablesynth.training.features import extract_features, load_features, module_fingerprint
from stablesynth.training.stage1 import train_stage1


class VideoRun:
    """A run over a real video dataset: its data, stage 1 and caches, composed with the shared :class:`Workspace`.

    Stage 2, evaluation and costs are the workspace's (the demo's own). ``mode="eval"`` loads finished checkpoints
    from ``out`` instead of training.
    """

    def __init__(self, cfg: RealDataConfig, out: Path, log: Callable[[str], None] = print,
                 dist: DistContext | None = None, mode: str = "train", features_dir: Path | None = None,
                 device: str | torch.device | None = None) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not cfg.data_root:
            raise ConfigError("data_root: no dataset folder given (--data-root)")
        self.cfg = cfg
        self.mode = mode
        self.dist = dist or SINGLE
        log = self.dist.log(log)
        self.log = log
        self.features_dir = features_dir or Path(out) / "features"
        self.K = cfg.label_count
        t = time.perf_counter()
        self._read_data()
        data_seconds = time.perf_counter() - t
        torch.manual_seed(cfg.seed)
        encoder = create_model(cfg.encoder_name, **cfg.encoder_overrides)
        model = (PairModel if cfg.is_pair else GlobalModel)(encoder, self.K, dropout=cfg.stage1.head_dropout)
        self.ws = Workspace(
            out=Path(out), seed=cfg.seed, K=self.K, seen=self.seen, model=model,
            # The untrained model is F-linear's frozen encoder and starting head (rebuilt from the seed in eval).
            initial=copy.deepcopy(model), method_config=self.method_config,
            num_categories=self.num_categories, answer_names=self.vocab.labels, paper_preset=cfg.preset,
            eval_batch_size=cfg.eval_batch_size, adapt_timing_repeats=cfg.adapt_timing_repeats,
            method_class=self.method_class, model_prefix=cfg.preset, require_checkpoints=mode == "eval", log=log,
            # Under torchrun each rank trains on its own GPU; stage 2 and evaluation run on rank 0's.
            device=training_device(device, self.dist),
        )
        configure_backends(self.ws.device)
        self.ws.timings["data"] = data_seconds

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

        self.ws.stage1_info = train_stage1(
            self.ws.model, loader, cfg.stage1, self.ws.out / "stage1", cfg.seed,
            manifest_extra={"encoder": cfg.encoder_name, "encoder_overrides": cfg.encoder_overrides,
                            "dataset": cfg.preset, "data": self.fingerprint(), "num_classes": self.K},
            log=self.log, dist=ctx, device=self.ws.device,
        )
        self.ws.model.cpu()
        self.ws.stage1_info["seconds"] = time.perf_counter() - t
        self.ws.timed("stage1", t)

    def load_stage1(self) -> None:
        """Eval mode: the trained stage-1 model from ``out/stage1``."""
        stage1 = self.ws.out / "stage1"
        tensors, manifest = load_checkpoint(stage1, expect_kind="stage1")
        if int(manifest.get("num_classes", self.K)) != self.K:
            raise CheckpointError(f"{stage1} has K = {manifest.get('num_classes')}, the config {self.K}")
        self.ws.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ws.stage1_info = {"history": manifest.get("history", []), "seconds": 0.0}

    # -- features ----------------------------------------------------------------------------

    def _cache(self, tag: str, encoder: nn.Module, split: str) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ds = self.datasets[split]
        batches = _chunks(list(range(len(ds))), cfg.eval_batch_size, drop_last=False)
        key = {"encoder": module_fingerprint(encoder), "dataset": cfg.preset, "split": split,
               "records": _dataset_digest(ds), "clips": len(ds), "video": ds.cfg.to_dict()}
        path = extract_features(encoder, lambda: ClipBatches(ds, batches), len(batches),
                                self.features_dir / f"{tag}-{split}", key, shard_batches=cfg.shard_batches,
                                desc=f"features {tag}/{split}", dist=self.dist, device=self.ws.device)
        encoder.cpu()
        return load_features(path)

    def cache_features(self, splits: Sequence[str] = ("history", "realtime")) -> None:
        t = time.perf_counter()
        ws = self.ws
        for split in splits:
            ws.rows[split] = self._cache("trained", ws.model.encoder, split)
        if ws.wants_untrained_features(self.cfg.methods):
            for split in splits:
                ws.rows[f"init_{split}"] = self._cache("init", ws.initial.encoder, split)
        ws.timed("features", t)

    # -- stage 2 -----------------------------------------------------------------------------

    def num_categories(self, kind: str) -> int:
        return {"question_type": 4, "device": max(self.device_ids) + 1, "answer": 2}[kind]

    def method_class(self, name: str) -> type[Method]:
        cls = METHODS.get(name)
        return pair_method_class(cls) if self.cfg.is_pair else cls

    def method_config(self, name: str) -> MethodConfig:
        mcfg = self.cfg.method_config(name)
        if self.cfg.is_pair and mcfg.num_categories is None and mcfg.category == "answer":
            # A pair task's "answer" is match / non-match: two categories for K = 1.
            mcfg = mcfg.replace(num_categories=2)
        return mcfg

    def evaluate_all(self) -> dict[str, Any]:
        """Stage 2 (or its checkpoints in eval mode) and the evaluation of every method."""
        ws, cfg = self.ws, self.cfg
        out: dict[str, Any] = {}
        for name in cfg.methods:
            if cfg.is_pair and self.method_class(name).needs_answer_classes:
                ws.log(f"{name}: skipped, it needs answer classes and {cfg.preset} scores (clip, text) pairs")
                continue
            method, train_seconds = ws.train_or_load(name)
            rt = ws.data(ws.feature_key("realtime", method), method.cfg.category)
            entry = method_entry(method, train_seconds)
            extra = ""
            if cfg.is_pair:
                task = cfg.task_preset.task
                entry["accuracy"], metrics = evaluate_pairs(method, rt, self.datasets["realtime"], self.seen, task,
                                                            cfg.eval_batch_size)
                key = "retrieval" if task == "retrieval" else "mc_accuracy"
                entry[key] = metrics["per_sample"]
                entry[f"{key}_per_session"] = metrics["per_session"]
                extra = ("  " + " ".join(f"{k} {100 * v:.1f}" for k, v in entry[key].items()) if key == "retrieval"
                         else f"  MC accuracy {100 * entry[key]:.1f}")
            else:
                entry["accuracy"] = ws.evaluate(method, rt)
            entry.update(ws.costs(name, method, rt))
            out[name] = entry
            log_accuracy(ws.log, entry, extra)
        return out

def _pair_benchmark(run: VideoRun) -> dict[str, Any]:
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


def _results(run: VideoRun, methods: dict[str, Any], t0: float, command: str) -> dict[str, Any]:
    cfg = run.cfg
    preset = cfg.task_preset
    ws = run.ws
    results = results_skeleton(t0=t0, seed=cfg.seed, command=command, config=cfg.to_dict(),
                               stage1_info=ws.stage1_info, timings=ws.timings, methods=methods,
                               paper={"preset": cfg.preset, **preset.paper.to_dict()})
    results.update({
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
        # Both need the embedded benchmark's synthetic capture profiles; real clips have none.
        "informative": None,
        "oracle": None,
    })
    return _empty_groups_nan(json_safe(results))


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


def train_realdata(cfg: RealDataConfig, out: Path, log: Callable[[str], None] = print,
                   dist: DistContext | None = None, device: str | torch.device | None = None) -> dict[str, Any] | None:
    """Stage 1, caches, stage 2, evaluation; writes results.json and report.md (rank 0 returns them)."""
    t0 = time.perf_counter()
    ctx = dist or SINGLE
    out = Path(out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG_FILE, cfg.to_dict())
    ctx.barrier()
    run = VideoRun(cfg, out, log=log, dist=ctx, device=device)
    run.stage1()
    run.cache_features()
    if not ctx.is_main:
        return None
    results = _results(run, run.evaluate_all(), t0, "train")
    write_outputs(results, out)
    run.log(f"wrote {out / 'results.json'} and {out / 'report.md'} in {time.perf_counter() - t0:.0f} s")
    return results


def eval_realdata(checkpoint_dir: Path, out: Path | None = None, log: Callable[[str], None] = print,
                  device: str | torch.device | None = None, **overrides: Any) -> dict[str, Any]:
    """Reload a finished ``train`` run, encode the test clips again and evaluate every method.

    ``overrides`` replace fields of the saved config (e.g. ``data_root`` when the data moved).
    """
    t0 = time.perf_counter()
    checkpoint_dir = Path(checkpoint_dir)
    saved = checkpoint_dir / RUN_CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} not found: is {checkpoint_dir} the --out of `stablesynth train`?")
    data = merge(json.loads(saved.read_text()), {k: v for k, v in overrides.items() if v is not None})
    cfg = RealDataConfig.from_dict(data)
    out = Path(out) if out is not None else checkpoint_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    run = VideoRun(cfg, checkpoint_dir, log=log, mode="eval", features_dir=out / "features", device=device)
    run.load_stage1()
    run.cache_features(splits=("realtime",))
    results = _results(run, run.evaluate_all(), t0, "eval")
    write_outputs(results, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def accuracy_table(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Just the accuracy blocks of every method (what train and eval must agree on)."""
    return {name: m["accuracy"] for name, m in results["methods"].items()}
