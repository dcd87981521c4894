"""The main job: stage 1 → feature caches → stage 2 for every method → evaluation → report.

One run writes everything under ``out``: ``stage1/`` (checkpoint), ``features/``
(caches), ``methods/<name>/`` (checkpoints), ``results.json``, ``report.md`` and the
plots. A second run with the same ``out`` reuses every finished stage whose inputs
are unchanged (checkpoints carry their config; caches carry the encoder's
fingerprint), unless ``reuse=False``.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stablesynth.accelerator import configure_backends, resolve_device
from stablesynth.config import Config, ConfigError, require
from stablesynth.data.benchmark import DeviceBenchmark
from stablesynth.data.benchmark_config import BenchmarkConfig
from stablesynth.data.clip_loader import make_loader
from stablesynth.data.device_grid import devices_grid_png
from stablesynth.experiment import studies
from stablesynth.experiment.caption_tasks import CaptionTaskConfig, run_caption_tasks
from stablesynth.experiment.results import json_safe, log_accuracy, method_entry, results_skeleton, write_outputs
from stablesynth.experiment.studies import OracleConfig
from stablesynth.experiment.workspace import Workspace, drop_stale_checkpoint
from stablesynth.methods import METHODS, Method, MethodConfig, default_method_config
from stablesynth.models.encoder import ENCODERS, create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.presets import get_preset
from stablesynth.training.features import cached_features, module_fingerprint
from stablesynth.training.stage0 import Stage0Config, load_stage0, pretrain_stage0
from stablesynth.training.stage1 import Stage1Config, train_stage1


def all_methods() -> list[str]:
    """Every registered method, in registration order (the report's row order)."""
    return METHODS.in_order()


class RunConfig(Config):
    """Everything one demo run needs; loaded from YAML/TOML and validated."""

    seed: int = Field(0, ge=0)
    encoder: str = "allinone-cpu"
    encoder_overrides: dict[str, Any] = Field(default_factory=dict)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    #: Stage 0, pretraining on clean easy-VQA (the part of the paper's pretrained All-in-One);
    #: None: the encoder starts from scratch in stage 1.
    stage0: Stage0Config | None = None
    #: Where stage-0 checkpoints are cached, keyed by their inputs ("": $STABLESYNTH_CACHE_DIR/stage0,
    #: else a ``stage0-cache`` folder beside the run's output folder, shared by its sibling runs).
    stage0_cache: str = ""
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    methods: list[str] = Field(default_factory=all_methods)
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    eval_batch_size: int = Field(128, ge=1)
    adapt_timing_repeats: int = Field(200, ge=1)
    #: Fresh shape questions per device for the global head's per-device goal (0: no probe); the
    #: real-time clips hold too few per device to decide it (studies.question_probe).
    shape_probe_per_device: int = Field(100, ge=0)
    paper_preset: str = "msrvtt-qa"
    #: What the run measures: open-ended QA ("qa"), multiple choice ("mc"), retrieval ("ret").
    tasks: list[Literal["qa", "mc", "ret"]] = Field(default_factory=lambda: ["qa"], min_length=1)
    #: The multiple-choice and retrieval tasks (used when ``tasks`` names one).
    captions: CaptionTaskConfig = Field(default_factory=CaptionTaskConfig)

    def check(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder: unknown encoder preset {self.encoder!r} (known: {', '.join(ENCODERS)})")
        check_method_names(self.methods, self.method_overrides)
        for name, overrides in self.method_overrides.items():
            try:
                default_method_config(name, **overrides)
            except ConfigError as exc:
                raise ConfigError(f"method_overrides.{name}.{exc}") from None
        image_size = self.encoder_overrides.get("image_size", ENCODERS.get(self.encoder).image_size)
        require(self.benchmark.image_size == image_size, "benchmark.image_size",
                f"{self.benchmark.image_size} differs from the encoder's image_size {image_size}")

    def method_config(self, name: str) -> MethodConfig:
        return default_method_config(name, **self.method_overrides.get(name, {}))


def check_method_names(methods: list[str], overrides: dict[str, Any]) -> None:
    """Every name in ``methods`` and ``method_overrides`` must be a registered method."""
    require(len(methods) > 0, "methods", "must name at least one method")
    for name in methods:
        if name not in METHODS:
            raise ConfigError(f"methods: unknown method {name!r} (known: {', '.join(METHODS.names())})")
    for name in overrides:
        if name not in METHODS:
            raise ConfigError(f"method_overrides: unknown method {name!r}")


def stage0_root(cfg: RunConfig, out: Path) -> Path:
    """The stage-0 cache: keyed by content, so every run and seed that can share a checkpoint does."""
    if cfg.stage0_cache:
        return Path(cfg.stage0_cache)
    if os.environ.get("STABLESYNTH_CACHE_DIR"):
        return Path(os.environ["STABLESYNTH_CACHE_DIR"]) / "stage0"
    return Path(out).resolve().parent / "stage0-cache"


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``demo``, ``quick``)."""
    path = Path(str(resources.files("stablesynth") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no packaged config {name!r} (known: {', '.join(known)})")
    return path


def load_run_config(path: str | Path | None = None, quick: bool = False) -> RunConfig:
    """A config file, a packaged config's name (``demo``, ``mild``, ``scratch``, ``harsh``, ``camera``,
    ``aux``, ``quick``), or the packaged default."""
    if path is not None:
        if not Path(path).exists() and Path(path).suffix == "":
            return RunConfig.from_file(packaged_config(str(path)))
        return RunConfig.from_file(path)
    return RunConfig.from_file(packaged_config("quick" if quick else "demo"))


class DemoRun:
    """One demo run in ``out``: the benchmark, the stage-1 model and the shared :class:`Workspace`."""

    def __init__(self, cfg: RunConfig, out: Path, reuse: bool = True, log: Callable[[str], None] = print,
                 device: str | torch.device = "cpu"):
        self.cfg = cfg
        out = Path(out)
        if not reuse and out.exists():
            for sub in ("stage1", "features", "methods"):
                shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        t = time.perf_counter()
        self.bench = DeviceBenchmark.build(cfg.benchmark)
        build_seconds = time.perf_counter() - t
        torch.manual_seed(cfg.seed)
        encoder = create_model(cfg.encoder, **cfg.encoder_overrides)
        model = GlobalModel(encoder, self.bench.num_classes, dropout=cfg.stage1.head_dropout)
        self.stage0_info: dict[str, Any] = {}
        if cfg.stage0 is not None:
            # Before the copy below: F-linear's frozen encoder is then the pretrained one, as in the paper.
            t0 = time.perf_counter()
            ckpt = pretrain_stage0(cfg.encoder, cfg.encoder_overrides, cfg.stage0, stage0_root(cfg, out), log=log,
                                   device=resolve_device(device))
            manifest = load_stage0(model, ckpt, self.bench.answer_names)
            self.stage0_info = {"checkpoint": ckpt.name, "clean_test": manifest.get("clean_test"),
                                "train_seconds": manifest.get("seconds"), "seconds": time.perf_counter() - t0}
        self.ws = Workspace(
            out=out, seed=cfg.seed, K=self.bench.num_classes, seen=set(self.bench.seen_devices), model=model,
            # The untrained model is F-linear's frozen encoder and starting head.
            initial=copy.deepcopy(model), method_config=cfg.method_config,
            num_categories=self.bench.num_categories, answer_names=self.bench.answer_names,
            paper_preset=cfg.paper_preset, eval_batch_size=cfg.eval_batch_size,
            adapt_timing_repeats=cfg.adapt_timing_repeats, reuse=reuse, log=log, device=resolve_device(device),
        )
        configure_backends(self.ws.device)
        self.ws.timings["benchmark_build"] = build_seconds
        if self.stage0_info:
            self.ws.timings["stage0"] = self.stage0_info["seconds"]
        self.ws.validation_ids = self.bench.samples("history").sample_id[self.bench.validation_rows()]

    def _stage1_fields(self) -> dict[str, Any]:
        return {"encoder": self.cfg.encoder, "encoder_overrides": self.cfg.encoder_overrides,
                "benchmark": self.bench.fingerprint(), "num_classes": self.ws.K, "seed": self.cfg.seed,
                "stage0": self.stage0_info.get("checkpoint")}

    def stage1(self) -> None:
        t = time.perf_counter()
        cfg, ws = self.cfg, self.ws
        ckpt = ws.out / "stage1"
        drop_stale_checkpoint(ckpt, {**self._stage1_fields(), "config": cfg.stage1.to_dict()}, ws.log,
                              Stage1Config)

        def loader(epoch: int):
            return make_loader(self.bench, "history", "train", batch_size=cfg.stage1.batch_size, shuffle=True,
                               seed=cfg.seed * 1000 + epoch, drop_last=True, attributes=cfg.stage1.aux_weight > 0)

        ws.stage1_info = train_stage1(ws.model, loader, cfg.stage1, ckpt, cfg.seed,
                                      manifest_extra=self._stage1_fields(), log=ws.log, device=ws.device)
        ws.model.cpu()
        ws.stage1_info["seconds"] = time.perf_counter() - t
        ws.timed("stage1", t)

    def cache_split(self, tag: str, encoder: nn.Module, split: str, devices: str, clean: bool = False) -> dict:
        """The cached features of ``encoder`` on ``devices``' clips of ``split`` (made when missing or stale)."""
        cfg = self.cfg
        rows = self.bench.rows(split, devices)
        n_batches = math.ceil(len(rows) / cfg.eval_batch_size)
        key = {"encoder": module_fingerprint(encoder), "benchmark": self.bench.fingerprint(), "split": split,
               "devices": devices, "clean": clean, "clips": len(rows)}
        cache_dir = self.ws.out / "features" / f"{tag}-{split}{'-clean' if clean else ''}"

        return cached_features(
            encoder, lambda: make_loader(self.bench, split, devices, batch_size=cfg.eval_batch_size, clean=clean),
            n_batches, cache_dir, key, f"features {tag}/{split}{' (clean)' if clean else ''}", self.ws.log,
            self.ws.device)

    def cache_features(self) -> None:
        t = time.perf_counter()
        ws = self.ws
        ws.rows = {
            "history": self.cache_split("trained", ws.model.encoder, "history", "all"),
            "realtime": self.cache_split("trained", ws.model.encoder, "realtime", "all"),
            "realtime_clean": self.cache_split("trained", ws.model.encoder, "realtime", "all", clean=True),
        }
        if ws.wants_untrained_features(self.cfg.methods):
            ws.rows["init_history"] = self.cache_split("init", ws.initial.encoder, "history", "seen")
            ws.rows["init_realtime"] = self.cache_split("init", ws.initial.encoder, "realtime", "all")
        ws.timed("features", t)

    def evaluate_methods(self) -> tuple[dict[str, Any], dict[str, Method]]:
        """Stage 2 (or its checkpoints) and the evaluation of every configured method."""
        ws = self.ws
        entries: dict[str, Any] = {}
        trained: dict[str, Method] = {}
        for name in self.cfg.methods:
            method, train_seconds = ws.train_or_load(name)
            trained[name] = method
            rt = ws.data(ws.feature_key("realtime", method), method.cfg.category)
            entry = method_entry(method, train_seconds)
            entry["accuracy"] = ws.evaluate(method, rt)
            entry.update(ws.costs(name, method, rt))
            if method.proposed:
                t = time.perf_counter()
                entry["encodings"] = studies.encoding_study(ws, method, rt, f"{ws.model_prefix}-{name}")
                ws.timed("encoding_study", t)
            entries[name] = entry
            log_accuracy(ws.log, entry)
        return entries, trained


def run_pipeline(cfg: RunConfig, out: Path, reuse: bool = True, log: Callable[[str], None] = print,
                 device: str | torch.device = "cpu") -> dict:
    """Run every stage of ``cfg.tasks`` and write results.json, report.md and the plots; returns the results."""
    t0 = time.perf_counter()
    run = DemoRun(cfg, out, reuse=reuse, log=log, device=device)
    ws = run.ws
    log(f"benchmark: {len(run.bench.devices)} devices ({len(ws.seen)} seen), K = {ws.K}; tasks "
        f"{', '.join(cfg.tasks)}; writing to {out}")
    devices_grid_png(run.bench, ws.out / "devices.png")
    run.stage1()
    entries: dict[str, Any] = {}
    oracle = informative = diag = None
    if "qa" in cfg.tasks:
        run.cache_features()
        realtime = ws.data("realtime")
        entries, trained = run.evaluate_methods()
        base = next((m for m in trained.values() if m.is_global_head), None)
        if cfg.oracle.enabled:
            t = time.perf_counter()
            oracle = studies.oracle(ws, cfg.oracle, ws.data("history"), realtime)
            ws.timed("oracle", t)
            log(f"{'oracle':>15}: all {100 * oracle['accuracy']['all']['mean']:.1f} "
                f"(median fine-tuning {oracle['finetune_seconds']['median']:.2f} s per device)")
        if base is not None and oracle is not None:
            informative = studies.informative_check(ws, base, realtime, oracle)
            log(informative["verdict"])
            if cfg.shape_probe_per_device:
                probe = informative["shape_probe"] = studies.question_probe(
                    ws, run.bench, "shape", cfg.shape_probe_per_device, cfg.eval_batch_size)
                log(f"shape probe: {100 * probe['mean']:.1f} over {probe['per_device']} questions per device; "
                    f"{probe['below_goal']} of {probe['devices']} devices under {100 * probe['goal']:.0f} % "
                    f"({probe['clearly_below_goal']} clearly), {probe['clearly_above_goal']} clearly above "
                    f"({probe['seconds']:.0f} s)")
            diag = studies.diagnostics(ws, base, ws.data("history"), realtime, n_devices=len(run.bench.devices))
    caption_tasks = {t for t in cfg.tasks if t != "qa"}
    tasks = run_caption_tasks(run, cfg.captions, caption_tasks, cfg.oracle.enabled) if caption_tasks else {}
    results = results_skeleton(
        t0=t0, seed=cfg.seed, command="stablesynth demo", config=cfg.to_dict(), stage1_info=ws.stage1_info,
        timings=ws.timings, methods=entries,
        paper={"preset": cfg.paper_preset, **get_preset(cfg.paper_preset).paper.to_dict()})
    results.update({
        "benchmark": {
            "num_classes": ws.K,
            "answers": run.bench.answer_names,
            "devices": [{"id": d.id, "seen": d.seen} for d in run.bench.devices],
            "counts": {s: len(run.bench.rows(s)) for s in ("history", "realtime")},
            "fingerprint": run.bench.fingerprint(),
            "accuracy_convention": f"top-1 over the {ws.K} easy-VQA answers (every answer is in the vocabulary)",
        },
        "stage0": run.stage0_info or None,
        "informative": informative,
        "diagnostics": diag,
        "oracle": oracle,
        "tasks": tasks,
        "figures": ["per_device_accuracy.png", "accuracy_vs_cost.png", "devices.png"] if entries else ["devices.png"],
    })
    results["wall_seconds"] = time.perf_counter() - t0
    results = json_safe(results)
    write_outputs(results, ws.out)
    log(f"wrote {ws.out / 'results.json'}, {ws.out / 'report.md'} and plots in {results['wall_seconds']:.0f} s")
    return results
