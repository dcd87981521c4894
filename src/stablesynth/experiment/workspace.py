"""The stages every run shares, over whatever data a task brings: stage 2, evaluation and costs.

A :class:`Workspace` is composed into a run (the embedded benchmark's
:class:`~stablesynth.experiment.demo.DemoRun` or the real datasets'
:class:`~stablesynth.experiment.realdata.run.VideoRun`). The run fills ``rows`` (the
feature caches) and ``stage1_info``; the workspace builds, trains or reloads every method,
evaluates it per device and measures its costs. It asks each method's class what it needs
to know (does it adapt, does stage 2 train it, does it read the untrained encoder).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stablesynth.checkpoint import CheckpointError, load_module_state, read_manifest, save_module
from stablesynth.config import Config, ConfigError
from stablesynth.data.batch import FeatureBatch
from stablesynth.evaluation.cost import count_flops, count_parameters, payload_bytes, time_call
from stablesynth.evaluation.metrics import accuracy_block, accuracy_by_device
from stablesynth.methods import METHODS, Method, MethodConfig, build_method
from stablesynth.models.device import dynamic_specs, total_numel
from stablesynth.models.global_model import GlobalModel
from stablesynth.presets import get_preset
from stablesynth.training.features import to_feature_batch
from stablesynth.training.stage2 import predict_per_sample, predict_per_session, train_method


def drop_stale_checkpoint(ckpt: Path, wanted: dict[str, Any], log: Callable[[str], None],
                          config_type: type[Config] | None = None) -> None:
    """Delete the stage-1 checkpoint ``ckpt`` unless its manifest has every field of ``wanted``.

    An interrupted run with the same inputs then resumes; anything else starts over. With
    ``config_type``, the stored ``config`` is read through it first, so an option added since,
    left at its default, does not make older checkpoints stale.
    """
    if not (ckpt / "manifest.json").exists():
        return
    try:
        old = read_manifest(ckpt)
    except CheckpointError as exc:
        old = {"error": str(exc)}
    if config_type is not None and isinstance(old.get("config"), dict):
        with contextlib.suppress(ConfigError):  # unreadable: it differs, and the checkpoint goes
            old = {**old, "config": config_type.from_dict(old["config"]).to_dict()}
    stale = sorted(k for k, v in wanted.items() if old.get(k) != v)
    if stale:
        log(f"stage 1: {ckpt} was trained with other {', '.join(stale)}; training again")
        shutil.rmtree(ckpt)


def _same_config(stored: Any, cfg: MethodConfig) -> bool:
    """Whether a checkpoint's stored method config is ``cfg``, read through MethodConfig first: an option
    added since, left at its default, does not make an older checkpoint stale."""
    if not isinstance(stored, dict):
        return False
    try:
        return MethodConfig.from_dict(stored).to_dict() == cfg.to_dict()
    except ConfigError:
        return False


@dataclass
class Workspace:
    """One run's output folder and what its stages share.

    ``method_config(name)`` gives a method's config; ``num_categories(kind)`` the size of a
    category kind; ``method_class(name)`` the class to build (a task may wrap the registered one).
    """

    out: Path
    seed: int
    K: int
    seen: set[int]
    model: GlobalModel
    initial: GlobalModel
    method_config: Callable[[str], MethodConfig]
    num_categories: Callable[[str], int]
    answer_names: list[str]
    paper_preset: str
    eval_batch_size: int = 128
    adapt_timing_repeats: int = 200
    method_class: Callable[[str], type[Method]] = METHODS.get
    #: Prefix of the model ids written into method checkpoints (the served model's name).
    model_prefix: str = "easyvqa"
    reuse: bool = True
    #: With True (re-evaluation), a method without a matching checkpoint is an error, not a reason to train.
    require_checkpoints: bool = False
    log: Callable[[str], None] = print
    #: Where stage 2 and evaluation run; models come back to the CPU after each step (checkpoints,
    #: costs and the studies are device-independent).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Sample ids of the validation clips (held-out history of seen devices): never trained on.
    validation_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    rows: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stage1_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    # -- data --------------------------------------------------------------------------------

    def feature_key(self, split: str, method: type[Method] | Method) -> str:
        """The feature cache a method reads for ``split`` (the untrained encoder's for F-linear)."""
        return f"init_{split}" if method.uses_untrained_encoder else split

    def wants_untrained_features(self, names: list[str]) -> bool:
        return any(self.method_class(n).uses_untrained_encoder for n in names)

    def data(self, key: str, category: str = "answer", devices: str | None = None) -> FeatureBatch:
        """Cached clips of ``key``; ``devices``: None (all), 'seen', 'train' (seen less validation), 'validation'."""
        rows = self.rows[key]
        batch = to_feature_batch(rows, category)
        if devices is None:
            return batch
        mask = torch.isin(batch.device, torch.tensor(sorted(self.seen)))
        if devices in ("train", "validation"):
            held = torch.isin(rows["sample_id"], self.validation_ids)
            mask &= held if devices == "validation" else ~held
        elif devices != "seen":
            raise ValueError(f"devices must be None, 'seen', 'train' or 'validation', got {devices!r}")
        return batch.index(torch.nonzero(mask).flatten())

    # -- methods -----------------------------------------------------------------------------

    def method(self, name: str, num_classes: int | None = None,
                     overrides: dict[str, Any] | None = None) -> Method:
        """The method with this run's config; with ``num_classes=None`` it starts from the stage-1 head."""
        cls = self.method_class(name)
        # A method that reuses another's stage 2 is that method's model: it has that method's config.
        mcfg = self.method_config(cls.stage2_of or name)
        if overrides:
            mcfg = mcfg.replace(**overrides)
        if mcfg.num_categories is None and mcfg.category != "answer":
            mcfg = mcfg.replace(num_categories=self.num_categories(mcfg.category))
        # A method's random initialisation depends on the run seed and its name alone, not on
        # what this process did before (stages trained or reused, other methods trained or
        # loaded): a fresh run and a resumed one then train the same method from the same start.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            method = build_method(name, num_classes or self.K, mcfg, cls=cls)
        if num_classes is None:
            src = self.initial if cls.uses_untrained_encoder else self.model
            method.init_from_head(src.static, src.classifier.weight.detach(), src.classifier.bias.detach())
        return method

    def train_or_load(self, name: str) -> tuple[Method, float]:
        """Stage 2 of one method, or its checkpoint when one made from the same stage 1 and config exists."""
        method = self.method(name)
        mcfg = method.cfg
        ckpt = self.out / "methods" / name
        stage1_sha = read_manifest(self.out / "stage1")["sha256"]
        if (self.reuse or self.require_checkpoints) and (ckpt / "manifest.json").exists():
            try:
                manifest = read_manifest(ckpt)
                if _same_config(manifest.get("config"), mcfg) and manifest.get("stage1_sha256") == stage1_sha:
                    load_module_state(ckpt, method, expect_kind="method")
                    self.log(f"stage 2 {name}: reusing {ckpt}")
                    return method, float(manifest.get("train_seconds", 0.0))
            except CheckpointError as exc:
                if self.require_checkpoints:
                    raise
                self.log(f"stage 2 {name}: not reusing {ckpt} ({exc})")
        if self.require_checkpoints:
            raise CheckpointError(f"{ckpt}: no checkpoint of {name} made by this run's stage 1 and config")
        history = self.feature_key("history", method)
        data = self.data(history, mcfg.category, devices="train")
        validation = self.data(history, mcfg.category, devices="validation") if len(self.validation_ids) else None
        if method.stage2_of is not None:
            # The same trained model (its stage 2 once, reused); only the method's own extra part is fitted.
            base, train_seconds = self.train_or_load(method.stage2_of)
            loaded = method.load_state_dict(base.state_dict(), strict=False)
            if loaded.unexpected_keys:
                raise CheckpointError(f"{name}: {method.stage2_of}'s state has keys {name} lacks: "
                                      f"{loaded.unexpected_keys[:3]}")
            method.prepare(data, validation)
            self.log(f"stage 2 {name}: {method.stage2_of}'s model, then {method.on_device()['hyper']} "
                     "(chosen on validation)")
        else:
            method.prepare(data, validation)
            train_seconds = self._stage2(name, method, data)
        save_module(ckpt, method, {
            "kind": "method", "method": name, "config": mcfg.to_dict(), "num_classes": self.K,
            "model_id": f"{self.model_prefix}-{name}", "model_version": stage1_sha[:12],
            "stage1_sha256": stage1_sha, "train_seconds": train_seconds, "answers": self.answer_names,
        })
        return method, train_seconds

    def _stage2(self, name: str, method: Method, data: FeatureBatch) -> float:
        """Train ``method`` on ``data`` (nothing for a method stage 2 leaves as it is); returns its seconds."""
        if not method.trains_in_stage2:
            return float(self.stage1_info.get("seconds", 0.0))
        mcfg = method.cfg
        info = train_method(method, data, mcfg.epochs, mcfg.batch_size, mcfg.lr, mcfg.weight_decay,
                            seed=self.seed, desc=f"stage 2 {name}", device=self.device)
        method.cpu()
        last = info["history"][-1] if info["history"] else {}
        self.log(f"stage 2 {name}: {info['steps']} steps in {info['seconds']:.1f} s; last epoch "
                 + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "epoch"))
        return float(info["seconds"])

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, method: Method, realtime: FeatureBatch) -> dict[str, Any]:
        """Per-device accuracy per sample (every clip its own upload) and per session (one upload a device)."""
        if method.session_causal:
            # Each clip sees only its session's earlier clips, in both modes.
            preds = torch.empty_like(realtime.label)
            session_preds = torch.empty_like(realtime.label)
            for d in realtime.device.unique().tolist():
                idx = torch.nonzero(realtime.device == d).flatten()
                session = realtime.index(idx)
                preds[idx] = method.predict_stream(session).argmax(-1)
                session_preds[idx] = (method.predict_stream(session, per_session=True).argmax(-1)
                                      if method.adaptive else preds[idx])
        else:
            preds = predict_per_sample(method, realtime, self.eval_batch_size, device=self.device)
            session_preds = torch.empty_like(realtime.label)
            for d in realtime.device.unique().tolist():
                idx = torch.nonzero(realtime.device == d).flatten()
                session_preds[idx] = predict_per_session(method, realtime.index(idx), device=self.device)
            method.cpu()
        per_dev = accuracy_by_device(preds, realtime.label, realtime.device)
        per_dev_session = accuracy_by_device(session_preds, realtime.label, realtime.device)
        return {"per_sample": accuracy_block(per_dev, self.seen),
                "per_session": accuracy_block(per_dev_session, self.seen)}

    def costs(self, name: str, method: Method, realtime: FeatureBatch) -> dict[str, Any]:
        """Parameters, bytes up and down, cloud FLOPs (here and at the paper's K) and time to adapt."""
        paper_K = get_preset(self.paper_preset).num_classes
        one = realtime.index(slice(0, 1))
        upload = method.upload(one)
        theta = total_numel(dynamic_specs(self.K)) if method.adaptive else 0
        out: dict[str, Any] = {
            "params": {"cloud": count_parameters(method), "device_static": count_parameters(method.static)},
            "bytes": {"up": int(upload.numel() * 4) if method.adaptive else 0,
                      "down": {"fp32": payload_bytes(theta, "fp32"), "fp16": payload_bytes(theta, "fp16"),
                               "int8": payload_bytes(theta, "int8", rows=self.K + 1) if theta else 0}},
        }
        if method.session_causal:
            out["device_cost"] = self.device_costs(method, realtime)
        if not method.adaptive:
            out["flops"] = {"benchmark": 0, "paper": 0, "benchmark_K": self.K, "paper_K": paper_K}
            out["adapt_ms"] = {"median": 0.0, "p90": 0.0, "repeats": 0}
            if method.session_causal:
                out["device_ms_per_clip"] = out["device_cost"]["ms_per_clip"]
            return out
        method.eval()
        with torch.inference_mode():
            driver = method.driver(upload)
            factors = method.generator.factors(driver)
            if method.generator.shared():
                out["bytes"]["down"]["factors"] = int(sum(t.numel() for t in factors.values()) * 4)
            out["bytes"]["down"]["driver"] = int(driver.numel() * 4)
            out["flops"] = {"benchmark": count_flops(method.adapt, upload),
                            "paper": self.paper_flops(name, upload, paper_K),
                            "benchmark_K": self.K, "paper_K": paper_K}
            f_g = one.f_g

            def adapt_and_predict() -> torch.Tensor:
                params = method.adapt(upload)
                return method.predict(f_g, {k: v[0] for k, v in params.items()})

            timing = time_call(adapt_and_predict, repeats=self.adapt_timing_repeats, warmup=10)
        out["adapt_ms"] = {"median": timing["median_ms"], "p90": timing["p90_ms"], "repeats": timing["repeats"]}
        return out

    def device_costs(self, method: Method, realtime: FeatureBatch) -> dict[str, Any]:
        """What the device spends per clip on its correction over one session: time, FLOPs (the head's
        forward included, a backward too where the correction takes one) and the state it keeps."""
        session = realtime.index(torch.nonzero(realtime.device == realtime.device[0]).flatten())
        n = max(len(session), 1)
        method.eval()
        weight, bias = method.session_theta(session)  # the cloud's Θ_d is not the device's work
        correction = method.correction

        def stream() -> torch.Tensor:
            return correction.stream(method.static, session.f_g, weight, bias)

        timing = time_call(stream, repeats=5, warmup=1)
        return {"ms_per_clip": timing["median_ms"] / n, "flops_per_clip": count_flops(stream) / n,
                "state_bytes": 4 * correction.state_floats(n, weight.shape[-1]), "session_clips": n,
                "backprop": bool(correction.backprop)}

    def paper_flops(self, name: str, upload: torch.Tensor, paper_K: int) -> int:
        """Cloud-step FLOPs of the same method at the paper's label count (untrained weights suffice)."""
        big = self.method(name, num_classes=paper_K)
        big.prepare_cost_count()
        big.eval()
        return count_flops(big.adapt, upload)

    def timed(self, key: str, t0: float) -> None:
        self.timings[key] = time.perf_counter() - t0
