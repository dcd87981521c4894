"""The main job: stage 1 → feature caches → stage 2 for every method → evaluation → report.

One run writes everything under ``out``: ``stage1/`` (checkpoint), ``features/``
(caches), ``methods/<name>/`` (checkpoints), ``results.json``, ``report.md`` and the
plots. A second run with the same ``out`` reuses every finished stage whose inputs
are unchanged (checkpoints carry their config; caches carry the encoder's
fingerprint), unless ``reuse=False``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

import stablesynth
import stablesynth.methods
from stablesynth.checkpoint import CheckpointError, load_module_state, read_manifest, save_module
from stablesynth.config import Config, ConfigError, require
from stablesynth.data.batch import FeatureBatch
from stablesynth.data.benchmark import BenchmarkConfig, DeviceBenchmark, devices_grid_png, make_loader
from stablesynth.evaluation import plots
from stablesynth.evaluation.cost import count_flops, count_parameters, payload_bytes, time_call
from stablesynth.evaluation.metrics import accuracy, accuracy_by_device, per_device_summary
from stablesynth.evaluation.report import SCHEMA_VERSION, render_report, validate_results
from stablesynth.methods.base import METHODS, Method
from stablesynth.methods.config import default_method_config
from stablesynth.models.encoder import ENCODERS, create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.features import (
    FeatureCacheError,
    extract_features,
    load_features,
    module_fingerprint,
    to_feature_batch,
)
from stablesynth.training.stage1 import Stage1Config, train_stage1
from stablesynth.training.stage2 import predict_per_sample, predict_per_session, train_method

METHOD_LABELS = {
    "f_linear": "F-linear",
    "fine_tune": "Fine-tuning",
    "f_hyper": "F-hyper",
    "duet": "DUET",
    "stablesynth": "StableSynthNet",
}
ALL_METHODS = ("f_linear", "fine_tune", "f_hyper", "duet", "stablesynth")


class OracleConfig(Config):
    """Per-device fine-tuning reference: the stage-1 head tuned on one device's history."""

    enabled: bool = True
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64

    def check(self) -> None:
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


class RunConfig(Config):
    """Everything one demo / training run needs; loaded from YAML/TOML and validated."""

    seed: int = 0
    encoder: str = "allinone-cpu"
    encoder_overrides: dict[str, Any] = Field(default_factory=dict)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    methods: list[str] = Field(default_factory=lambda: list(ALL_METHODS))
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    eval_batch_size: int = 128
    adapt_timing_repeats: int = 200
    paper_preset: str = "msrvtt-qa"

    def check(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder: unknown encoder preset {self.encoder!r} (known: {', '.join(ENCODERS)})")
        require(len(self.methods) > 0, "methods", "must name at least one method")
        for name in self.methods:
            if name not in METHODS:
                raise ConfigError(f"methods: unknown method {name!r} (known: {', '.join(METHODS.names())})")
        for name, overrides in self.method_overrides.items():
            if name not in METHODS:
                raise ConfigError(f"method_overrides: unknown method {name!r}")
            try:
                default_method_config(name, **overrides)
            except ConfigError as exc:
                raise ConfigError(f"method_overrides.{name}.{exc}") from None
        image_size = self.encoder_overrides.get("image_size", ENCODERS.get(self.encoder).image_size)
        require(self.benchmark.image_size == image_size, "benchmark.image_size",
                f"{self.benchmark.image_size} differs from the encoder's image_size {image_size}")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.adapt_timing_repeats >= 1, "adapt_timing_repeats", "must be >= 1")

    def method_config(self, name: str):
        return default_method_config(name, **self.method_overrides.get(name, {}))


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``demo``, ``quick``)."""
    path = Path(str(resources.files("stablesynth") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no packaged config {name!r} (known: {', '.join(known)})")
    return path


def load_run_config(path: str | Path | None = None, quick: bool = False) -> RunConfig:
    if path is not None:
        return RunConfig.from_file(path)
    return RunConfig.from_file(packaged_config("quick" if quick else "demo"))


def versions() -> dict[str, str]:
    import numpy
    import onnxruntime

    return {
        "stablesynth": stablesynth.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": str(torch.get_num_threads()),
    }


# ---------------------------------------------------------------------------------------------
# stages


class Run:
    """State of one pipeline run in ``out``; each stage method is idempotent."""

    def __init__(self, cfg: RunConfig, out: Path, reuse: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.out = Path(out)
        self.reuse = reuse
        self.log = log
        if not reuse and self.out.exists():
            for sub in ("stage1", "features", "methods"):
                shutil.rmtree(self.out / sub, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        torch.manual_seed(cfg.seed)
        t = time.perf_counter()
        self.bench = DeviceBenchmark.build(cfg.benchmark)
        self.timings["benchmark_build"] = time.perf_counter() - t
        self.K = self.bench.num_classes
        self.seen = set(self.bench.seen_devices)
        torch.manual_seed(cfg.seed)
        encoder = create_model(cfg.encoder, **cfg.encoder_overrides)
        self.model = GlobalModel(encoder, self.K, dropout=cfg.stage1.head_dropout)
        # The untrained model is F-linear's frozen encoder and starting head.
        self.initial = copy.deepcopy(self.model)
        self.features: dict[str, FeatureBatch] = {}
        self.stage1_info: dict[str, Any] = {}

    def _stage1_fields(self) -> dict[str, Any]:
        return {"encoder": self.cfg.encoder, "encoder_overrides": self.cfg.encoder_overrides,
                "benchmark": self.bench.fingerprint(), "num_classes": self.K, "seed": self.cfg.seed}

    def stage1(self) -> None:
        t = time.perf_counter()
        cfg = self.cfg
        ckpt = self.out / "stage1"
        if (ckpt / "manifest.json").exists():
            try:
                old = read_manifest(ckpt)
            except CheckpointError as exc:
                old = {"error": str(exc)}
            wanted = {**self._stage1_fields(), "config": cfg.stage1.to_dict()}
            stale = sorted(k for k, v in wanted.items() if old.get(k) != v)
            # An interrupted run with the same inputs resumes; anything else starts over.
            if stale:
                self.log(f"stage 1: {ckpt} was trained with other {', '.join(stale)}; training again")
                shutil.rmtree(ckpt)

        def loader(epoch: int):
            return make_loader(self.bench, "history", "seen", batch_size=cfg.stage1.batch_size, shuffle=True,
                               seed=cfg.seed * 1000 + epoch, drop_last=True)

        self.stage1_info = train_stage1(
            self.model, loader, cfg.stage1, self.out / "stage1", cfg.seed,
            manifest_extra=self._stage1_fields(),
            log=self.log,
        )
        self.stage1_info["seconds"] = time.perf_counter() - t
        self.timings["stage1"] = self.stage1_info["seconds"]

    def _cache(self, tag: str, encoder: nn.Module, split: str, devices: str, clean: bool = False) -> dict:
        cfg = self.cfg
        rows = self.bench.rows(split, devices)
        n_batches = math.ceil(len(rows) / cfg.eval_batch_size)
        key = {"encoder": module_fingerprint(encoder), "benchmark": self.bench.fingerprint(), "split": split,
               "devices": devices, "clean": clean, "clips": len(rows)}
        cache_dir = self.out / "features" / f"{tag}-{split}{'-clean' if clean else ''}"

        def extract() -> Path:
            return extract_features(
                encoder,
                lambda: make_loader(self.bench, split, devices, batch_size=cfg.eval_batch_size, clean=clean),
                n_batches, cache_dir, key, desc=f"features {tag}/{split}{' (clean)' if clean else ''}",
            )

        try:
            return load_features(extract())
        except FeatureCacheError as exc:
            # Stale (another encoder, other clips) or damaged: its rows are worthless, so rebuild once.
            self.log(f"rebuilding {cache_dir}: {str(exc).split(';')[0]}")
            shutil.rmtree(cache_dir)
            return load_features(extract())

    def cache_features(self) -> None:
        t = time.perf_counter()
        self.rows = {
            "history": self._cache("trained", self.model.encoder, "history", "all"),
            "realtime": self._cache("trained", self.model.encoder, "realtime", "all"),
            "realtime_clean": self._cache("trained", self.model.encoder, "realtime", "all", clean=True),
        }
        if "f_linear" in self.cfg.methods:
            self.rows["init_history"] = self._cache("init", self.initial.encoder, "history", "seen")
            self.rows["init_realtime"] = self._cache("init", self.initial.encoder, "realtime", "all")
        self.timings["features"] = time.perf_counter() - t

    def data(self, key: str, category: str = "answer", devices: str | None = None) -> FeatureBatch:
        batch = to_feature_batch(self.rows[key], category)
        if devices == "seen":
            mask = torch.isin(batch.device, torch.tensor(sorted(self.seen)))
            batch = batch.index(torch.nonzero(mask).flatten())
        return batch

    # -- methods ---------------------------------------------------------------------------

    #: With True (re-evaluation), a method without a matching checkpoint is an error, not a reason to train.
    require_checkpoints: bool = False
    #: Prefix of the model ids written into method checkpoints (the served model's name).
    model_prefix: str = "easyvqa"

    def answer_names(self) -> list[str]:
        return self.bench.answer_names

    def num_categories(self, kind: str) -> int:
        return self.bench.num_categories(kind)

    def method_class(self, name: str) -> type[Method]:
        return METHODS.get(name)

    def build_method(self, name: str, num_classes: int | None = None,
                     overrides: dict[str, Any] | None = None) -> Method:
        mcfg = self.cfg.method_config(name)
        if overrides:
            mcfg = mcfg.replace(**overrides)
        if mcfg.num_categories is None and mcfg.category != "answer":
            mcfg = mcfg.replace(num_categories=self.num_categories(mcfg.category))
        method = self.method_class(name)(mcfg, num_classes or self.K)
        if num_classes is None:
            src = self.initial if name == "f_linear" else self.model
            method.init_from_head(src.static, src.classifier.weight.detach(), src.classifier.bias.detach())
        return method

    def train_or_load(self, name: str) -> tuple[Method, float]:
        method = self.build_method(name)
        mcfg = method.cfg
        ckpt = self.out / "methods" / name
        stage1_sha = read_manifest(self.out / "stage1")["sha256"]
        if (self.reuse or self.require_checkpoints) and (ckpt / "manifest.json").exists():
            try:
                manifest = read_manifest(ckpt)
                if manifest.get("config") == mcfg.to_dict() and manifest.get("stage1_sha256") == stage1_sha:
                    load_module_state(ckpt, method, expect_kind="method")
                    self.log(f"stage 2 {name}: reusing {ckpt}")
                    return method, float(manifest.get("train_seconds", 0.0))
            except CheckpointError as exc:
                if self.require_checkpoints:
                    raise
                self.log(f"stage 2 {name}: not reusing {ckpt} ({exc})")
        if self.require_checkpoints:
            raise CheckpointError(f"{ckpt}: no checkpoint of {name} made by this run's stage 1 and config")
        train_seconds = 0.0
        if method.trains_in_stage2:
            history_key = "init_history" if name == "f_linear" else "history"
            data = self.data(history_key, mcfg.category, devices="seen")
            info = train_method(method, data, mcfg.epochs, mcfg.batch_size, mcfg.lr, mcfg.weight_decay,
                                seed=self.cfg.seed, desc=f"stage 2 {name}")
            train_seconds = info["seconds"]
            last = info["history"][-1] if info["history"] else {}
            self.log(f"stage 2 {name}: {info['steps']} steps in {train_seconds:.1f} s; last epoch "
                     + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "epoch"))
        else:
            train_seconds = float(self.stage1_info.get("seconds", 0.0))
        save_module(ckpt, method, {
            "kind": "method", "method": name, "config": mcfg.to_dict(), "num_classes": self.K,
            "model_id": f"{self.model_prefix}-{name}", "model_version": stage1_sha[:12],
            "stage1_sha256": stage1_sha, "train_seconds": train_seconds, "answers": self.answer_names(),
        })
        return method, train_seconds

    def evaluate(self, method: Method, realtime: FeatureBatch) -> dict[str, Any]:
        preds = predict_per_sample(method, realtime, self.cfg.eval_batch_size)
        per_dev = accuracy_by_device(preds, realtime.label, realtime.device)
        session_preds = torch.empty_like(realtime.label)
        for d in realtime.device.unique().tolist():
            idx = torch.nonzero(realtime.device == d).flatten()
            session_preds[idx] = predict_per_session(method, realtime.index(idx))
        per_dev_session = accuracy_by_device(session_preds, realtime.label, realtime.device)

        def block(acc: dict[int, float]) -> dict[str, Any]:
            summary = per_device_summary(acc, self.seen)
            return {"per_device": {str(k): v for k, v in sorted(acc.items())},
                    **{g: {k: summary[g][k] for k in ("mean", "worst", "std", "n")} for g in ("seen", "unseen", "all")}}

        return {"per_sample": block(per_dev), "per_session": block(per_dev_session)}

    def costs(self, name: str, method: Method, realtime: FeatureBatch) -> dict[str, Any]:
        paper_K = _paper_k(self.cfg.paper_preset)
        one = realtime.index(slice(0, 1))
        upload = method.upload(one)
        theta = 97 * self.K if method.adaptive else 0
        out: dict[str, Any] = {
            "params": {"cloud": count_parameters(method), "device_static": count_parameters(method.static)},
            "bytes": {"up": int(upload.numel() * 4) if method.adaptive else 0,
                      "down": {"fp32": payload_bytes(theta, "fp32"), "fp16": payload_bytes(theta, "fp16"),
                               "int8": payload_bytes(theta, "int8", rows=self.K + 1) if theta else 0}},
        }
        if not method.adaptive:
            out["flops"] = {"benchmark": 0, "paper": 0, "benchmark_K": self.K, "paper_K": paper_K}
            out["adapt_ms"] = {"median": 0.0, "p90": 0.0, "repeats": 0}
            return out
        method.eval()
        with torch.inference_mode():
            driver = method.driver(upload)
            factors = method.generator.factors(driver)
            if method.generator.shared():
                out["bytes"]["down"]["factors"] = int(sum(t.numel() for t in factors.values()) * 4)
            out["bytes"]["down"]["driver"] = int(driver.numel() * 4)
            out["flops"] = {
                "benchmark": count_flops(method.adapt, upload),
                "paper": _paper_flops(self, name, upload, paper_K),
                "benchmark_K": self.K, "paper_K": paper_K,
            }
            f_g = one.f_g

            def adapt_and_predict() -> torch.Tensor:
                params = method.adapt(upload)
                return method.predict(f_g, {k: v[0] for k, v in params.items()})

            timing = time_call(adapt_and_predict, repeats=self.cfg.adapt_timing_repeats, warmup=10)
        out["adapt_ms"] = {"median": timing["median_ms"], "p90": timing["p90_ms"], "repeats": timing["repeats"]}
        return out

    @torch.inference_mode()
    def encoding_study(self, method: Method, realtime: FeatureBatch, model_id: str) -> dict[str, Any]:
        """Every download encoding through the real wire format, per real-time clip.

        For each encoding: frame bytes (header included), accuracy with the decoded
        parameters, the change against fp32, the device's time to turn a frame into a
        usable model (decode, rebuild, predict) and what the device must hold in advance.
        """
        from stablesynth.serving import protocol

        method.eval()
        gen = method.generator
        uploads = method.upload(realtime)
        drivers = method.driver(uploads)
        f_g = realtime.f_g
        shared_bytes = sum(t.numel() * 4 for t in gen.shared().values())
        gen_bytes = sum(p.numel() * 4 for p in gen.parameters())
        variants: dict[str, tuple[str, Callable[[int], dict[str, torch.Tensor]]]] = {
            "fp32": ("fp32", lambda i: {k: v[0] for k, v in gen(drivers[i:i + 1]).items()}),
            "fp16": ("fp16", lambda i: {k: v[0] for k, v in gen(drivers[i:i + 1]).items()}),
            "int8": ("int8", lambda i: {k: v[0] for k, v in gen(drivers[i:i + 1]).items()}),
            "driver": ("driver", lambda i: {"driver": drivers[i]}),
            "driver-int8": ("int8", lambda i: {"driver": drivers[i]}),
        }
        if gen.shared():
            variants["factors"] = ("factors", lambda i: {k: v[0] for k, v in gen.factors(drivers[i:i + 1]).items()})
            variants["factors-int8"] = ("int8",
                                        lambda i: {k: v[0] for k, v in gen.factors(drivers[i:i + 1]).items()})

        def rebuild(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if name.startswith("factors"):
                return {k: v[0] for k, v in gen.expand({k: v.unsqueeze(0) for k, v in tensors.items()}).items()}
            if name.startswith("driver"):
                return {k: v[0] for k, v in gen(tensors["driver"].unsqueeze(0)).items()}
            return tensors

        out: dict[str, Any] = {}
        n = len(realtime)
        for name, (wire, make) in variants.items():
            frames = [protocol.encode(make(i), wire, model_id, "study") for i in range(n)]
            preds = torch.empty(n, dtype=torch.long)
            t0 = time.perf_counter()
            for i, frame in enumerate(frames):
                tensors, _ = protocol.decode(frame, expect_model_id=model_id)
                params = rebuild(name, tensors)
                preds[i] = method.predict(f_g[i:i + 1], params).argmax(-1)[0]
            device_ms = (time.perf_counter() - t0) * 1000 / max(n, 1)
            per_dev = accuracy_by_device(preds, realtime.label, realtime.device)
            out[name] = {
                "wire_encoding": wire,
                "bytes": len(frames[0]),
                "payload_bytes": len(frames[0]) - protocol.decode_header(frames[0])[1],
                "accuracy": per_device_summary(per_dev, self.seen)["all"]["mean"],
                "device_ms": device_ms,
                "device_holds_bytes": (shared_bytes if name.startswith("factors")
                                       else gen_bytes if name.startswith("driver") else 0),
            }
        ref = out["fp32"]["accuracy"]
        for v in out.values():
            v["delta_points"] = 100 * (v["accuracy"] - ref)
        return out

    def oracle(self, base: Method, history: FeatureBatch, realtime: FeatureBatch) -> dict[str, Any]:
        """Per-device fine-tuning of the stage-1 head on each device's history (timed)."""
        ocfg = self.cfg.oracle
        per_dev, seconds = {}, {}
        for d in tqdm(sorted(realtime.device.unique().tolist()), desc="per-device fine-tuning", leave=False):
            hist = history.index(torch.nonzero(history.device == d).flatten())
            test = realtime.index(torch.nonzero(realtime.device == d).flatten())
            static = copy.deepcopy(self.model.static)
            classifier = copy.deepcopy(self.model.classifier)
            head = nn.Sequential(static, classifier)
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + d)
            t = time.perf_counter()
            f_g = hist.f_g
            opt = torch.optim.AdamW(head.parameters(), lr=ocfg.lr)
            head.train()
            for _ in range(ocfg.epochs):
                order = torch.randperm(len(hist), generator=gen)
                for s in range(0, len(order), ocfg.batch_size):
                    idx = order[s:s + ocfg.batch_size]
                    loss = nn.functional.cross_entropy(head(f_g[idx]), hist.label[idx], ignore_index=-100)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            seconds[str(d)] = time.perf_counter() - t
            head.eval()
            with torch.inference_mode():
                per_dev[int(d)] = accuracy(head(test.f_g), test.label)
        summary = per_device_summary(per_dev, self.seen)
        med = sorted(seconds.values())[len(seconds) // 2]
        return {
            "accuracy": {"per_device": {str(k): v for k, v in sorted(per_dev.items())},
                         **{g: {k: summary[g][k] for k in ("mean", "worst", "std", "n")}
                            for g in ("seen", "unseen", "all")}},
            "finetune_seconds": {"median": med, "per_device": seconds},
            "config": ocfg.to_dict(),
        }


def informative_check(run: Run, base: Method, realtime: FeatureBatch, oracle: dict[str, Any]) -> dict[str, Any]:
    """DESIGN §5: does a single global head lose accuracy to the device shift, and does adaptation win it back?

    The global head is trained on the seen devices' history, so their casts are in its training
    data; the shift it has not seen is that of the unseen devices. Clean frames (identity profile)
    are reported as a reference.
    """
    clean = run.data("realtime_clean")
    seen_mask = torch.isin(realtime.device, torch.tensor(sorted(run.seen)))
    preds = predict_per_sample(base, realtime)
    g_clean = accuracy(predict_per_sample(base, clean), clean.label)
    g_seen = accuracy(preds[seen_mask], realtime.label[seen_mask])
    g_unseen = accuracy(preds[~seen_mask], realtime.label[~seen_mask]) if (~seen_mask).any() else float("nan")
    o_seen = oracle["accuracy"]["seen"]["mean"]
    o_unseen = oracle["accuracy"]["unseen"]["mean"]
    gain = max(o_seen - g_seen, (o_unseen - g_unseen) if math.isfinite(g_unseen) else -1.0)
    verdict = (
        f"The global head scores {100 * g_seen:.1f} on seen devices and {100 * g_unseen:.1f} on unseen ones "
        f"({100 * g_clean:.1f} on clean frames); per-device fine-tuning reaches {100 * o_seen:.1f} and "
        f"{100 * o_unseen:.1f}, so adaptation can win up to {100 * gain:.1f} points."
    )
    verdict += (" The benchmark is informative." if gain >= 0.02 else
                " That is too little for adaptation to show: treat the comparison below with care.")
    return {"global_clean": g_clean, "global_seen": g_seen, "global_unseen": g_unseen,
            "oracle_seen": o_seen, "oracle_unseen": o_unseen, "verdict": verdict}


def diagnostics(run: Run, base: Method, history: FeatureBatch, realtime: FeatureBatch) -> dict[str, Any]:
    """What a single upload could tell the cloud, measured on this run's features.

    device_probe: a linear probe from one uploaded frame feature to the device id, trained on
    the seen devices' history, scored on their real-time clips: can one frame identify its device?
    prior_correction: the global head's posteriors re-weighted by each device's answer
    frequencies in its history (p(a|x)·p_d(a)/p(a)): how much of per-device fine-tuning's gain is
    the device's usage skew, which an unlabeled frame of an unseen device cannot reveal.
    """
    seen = torch.tensor(sorted(run.seen))
    hist_seen = history.index(torch.nonzero(torch.isin(history.device, seen)).flatten())
    rt_seen_mask = torch.isin(realtime.device, seen)
    gen = torch.Generator().manual_seed(run.cfg.seed)
    n_dev = len(run.bench.devices)
    probe = nn.Linear(hist_seen.uploaded.shape[1], n_dev)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=gen)
        probe.bias.zero_()
    x = hist_seen.uploaded
    mu, sd = x.mean(0), x.std(0) + 1e-6
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(probe((x - mu) / sd), hist_seen.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        rt_up = realtime.uploaded[rt_seen_mask]
        probe_acc = accuracy(probe((rt_up - mu) / sd), realtime.device[rt_seen_mask])
    K = run.K
    with torch.inference_mode():
        base.eval()
        logp = base(realtime).log_softmax(-1)
    valid = history.label >= 0
    prior = torch.stack([torch.bincount(history.label[valid & (history.device == d)], minlength=K).double() + 1
                         for d in range(n_dev)])
    prior = (prior / prior.sum(1, keepdim=True)).float()
    pooled = torch.bincount(hist_seen.label[hist_seen.label >= 0], minlength=K).double() + 1
    pooled = (pooled / pooled.sum()).float()
    adjusted = logp + prior[realtime.device].log() - pooled.log()
    out = {"device_probe_accuracy": probe_acc, "chance": 1.0 / len(run.seen)}
    for group, mask in (("seen", rt_seen_mask), ("unseen", ~rt_seen_mask)):
        if mask.any():
            out[f"global_{group}"] = accuracy(logp[mask], realtime.label[mask])
            out[f"prior_corrected_{group}"] = accuracy(adjusted[mask], realtime.label[mask])
    return out


def _paper_k(preset: str) -> int:
    from stablesynth.presets import get_preset

    return get_preset(preset).num_classes


def _paper_flops(run: Run, name: str, upload: torch.Tensor, paper_K: int) -> int:
    """Cloud-step FLOPs of the same method at the paper's label count (untrained weights suffice)."""
    big = run.build_method(name, num_classes=paper_K)
    templates = getattr(big, "templates", None)
    if templates is not None and big.cfg.templates:
        # A trained model has every template; an empty bank would skip the selection and under-count.
        with torch.no_grad():
            templates.P.normal_()
            templates.initialised.fill_(True)
    big.eval()
    return count_flops(big.adapt, upload)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run_pipeline(cfg: RunConfig, out: Path, reuse: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every stage and write results.json, report.md and the plots; returns the results."""
    t0 = time.perf_counter()
    run = Run(cfg, out, reuse=reuse, log=log)
    log(f"benchmark: {len(run.bench.devices)} devices ({len(run.seen)} seen), K = {run.K}; writing to {out}")
    devices_grid_png(run.bench, run.out / "devices.png")
    run.stage1()
    run.cache_features()
    realtime = run.data("realtime")
    results_methods: dict[str, Any] = {}
    trained: dict[str, Method] = {}
    for name in cfg.methods:
        method, train_seconds = run.train_or_load(name)
        trained[name] = method
        rt = run.data("init_realtime" if name == "f_linear" else "realtime", method.cfg.category)
        entry = {"label": METHOD_LABELS.get(name, name), "adaptive": bool(method.adaptive),
                 "train_seconds": train_seconds, "config": method.cfg.to_dict()}
        entry["accuracy"] = run.evaluate(method, rt)
        entry.update(run.costs(name, method, rt))
        if name == "stablesynth":
            t = time.perf_counter()
            entry["encodings"] = run.encoding_study(method, rt, f"easyvqa-{name}")
            run.timings["encoding_study"] = time.perf_counter() - t
        results_methods[name] = entry
        acc = entry["accuracy"]["per_sample"]
        log(f"{entry['label']:>15}: seen {100 * acc['seen']['mean']:.1f}  unseen {100 * acc['unseen']['mean']:.1f}"
            f"  worst {100 * acc['all']['worst']:.1f}  std {100 * acc['all']['std']:.1f}")
    oracle = None
    informative = None
    base = trained.get("fine_tune")
    if cfg.oracle.enabled:
        t = time.perf_counter()
        oracle = run.oracle(base, run.data("history"), realtime)
        run.timings["oracle"] = time.perf_counter() - t
        log(f"{'oracle':>15}: all {100 * oracle['accuracy']['all']['mean']:.1f} "
            f"(median fine-tuning {oracle['finetune_seconds']['median']:.2f} s per device)")
    diag = None
    if base is not None and oracle is not None:
        informative = informative_check(run, base, realtime, oracle)
        log(informative["verdict"])
        diag = diagnostics(run, base, run.data("history"), realtime)
    payload_rows = _payload_rows()
    from stablesynth.presets import get_preset

    paper = get_preset(cfg.paper_preset).paper.to_dict()
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t0,
        "versions": versions(),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "benchmark": {
            "num_classes": run.K,
            "answers": run.bench.answer_names,
            "devices": [{"id": d.id, "seen": d.seen} for d in run.bench.devices],
            "counts": {s: len(run.bench.rows(s)) for s in ("history", "realtime")},
            "fingerprint": run.bench.fingerprint(),
            "accuracy_convention": "top-1 over the 13 easy-VQA answers (every answer is in the vocabulary)",
        },
        "stage1": {"history": run.stage1_info.get("history", []), "seconds": run.stage1_info.get("seconds", 0.0)},
        "timings": run.timings,
        "informative": informative,
        "diagnostics": diag,
        "methods": results_methods,
        "oracle": oracle,
        "paper": {"preset": cfg.paper_preset, **paper},
        "payload": payload_rows,
        "command": "stablesynth demo",
        "figures": ["per_device_accuracy.png", "accuracy_vs_cost.png", "devices.png"],
    }
    results = _json_safe(results)
    write_outputs(results, run.out)
    results["wall_seconds"] = time.perf_counter() - t0
    write_outputs(results, run.out)
    log(f"wrote {run.out / 'results.json'}, {run.out / 'report.md'} and plots in {results['wall_seconds']:.0f} s")
    return results


def _payload_rows() -> list[dict[str, Any]]:
    from stablesynth.bench.payload import payload_table

    return payload_table()


def write_outputs(results: dict[str, Any], out: Path) -> None:
    validate_results(results)
    ablation_path = out / "ablation.json"
    ablation = json.loads(ablation_path.read_text()) if ablation_path.exists() else None
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    plots.per_device_accuracy(results, out / "per_device_accuracy.png")
    plots.accuracy_vs_cost(results, out / "accuracy_vs_cost.png")
    (out / "report.md").write_text(render_report(results, ablation))


def _fields(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]
