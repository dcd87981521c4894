"""`stablesynth bench ablate`: StableSynthNet with one change at a time, over several seeds.

Reuses the demo run's stage-1 checkpoint and feature caches in the same folder, so
only stage 2 is repeated; results go to ``ablation.json`` and into ``report.md``. The
``encoder`` group changes how the encoder is trained (camera-like pretraining, stage-1
colour and shape heads): each of those trains its own stage 1 and feature caches in
``<out>/ablate/<variant>/`` (stage 0 comes from the shared cache), then StableSynthNet on them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stablesynth.data.batch import FeatureBatch
from stablesynth.evaluation import plots
from stablesynth.evaluation.metrics import per_device_summary
from stablesynth.evaluation.stats import bootstrap_mean_ci, format_ci, paired_difference, verdict
from stablesynth.experiment.demo import DemoRun, RunConfig, stage0_root
from stablesynth.experiment.results import write_outputs
from stablesynth.files import atomic_write_json
from stablesynth.training.stage2 import train_method


@dataclass(frozen=True)
class Variant:
    group: str
    name: str
    method: str
    overrides: dict[str, Any]
    frames: int | None = None  # D: frames averaged into F_g (None: the benchmark's)
    #: Changes to sections of the run config (``{"stage0": {"augment": "camera"}}``): the variant
    #: trains its own encoder in a folder of its own; empty: the demo run's encoder.
    run: dict[str, dict[str, Any]] = field(default_factory=dict)
    slug: str = ""  # that folder's name

    def run_config(self, cfg: RunConfig) -> RunConfig | None:
        """``cfg`` with this variant's changes, or None when a section it changes is off (no stage 0)."""
        for section, fields in self.run.items():
            part = getattr(cfg, section)
            if part is None:
                return None
            cfg = cfg.replace(**{section: part.replace(**fields)})
        return cfg


def variants(frames_per_clip: int) -> list[Variant]:
    v = [
        Variant("reference", "StableSynthNet (defaults)", "stablesynth", {}),
        Variant("reference", "F-hyper (all modules off)", "f_hyper", {}),
        Variant("modules", "− contrastive (Eq. 5–6)", "stablesynth", {"contrastive": False}),
        Variant("modules", "− variance (Eq. 7–8)", "stablesynth", {"variance": False}),
        Variant("modules", "− templates (Eq. 9–12)", "stablesynth", {"templates": False}),
        Variant("templates", "update: literal", "stablesynth", {"template_update": "literal"}),
        Variant("templates", "fusion: template pattern", "stablesynth", {"fusion_direction": "template_pattern"}),
        Variant("templates", "select: soft", "stablesynth", {"template_select": "soft"}),
        Variant("generator", "generator: full", "stablesynth", {"generator": "full"}),
        Variant("generator", "generator: lowrank", "stablesynth", {"generator": "lowrank"}),
        Variant("generator", "generator: film", "stablesynth", {"generator": "film"}),
        Variant("stage2", "stage 2 trains everything", "stablesynth", {"stage2_trains": "all"}),
        Variant("stage2", "control, stage 2 trains everything", "stage2_control", {"stage2_trains": "all"}),
        Variant("stage2", "control (adaptation off)", "stage2_control", {}),
        Variant("encoder", "stage 0 sees camera-like captures", "stablesynth", {},
                run={"stage0": {"augment": "camera"}}, slug="stage0-camera"),
        Variant("encoder", "stage 1 colour and shape heads", "stablesynth", {},
                run={"stage1": {"aux_weight": 1.0}}, slug="stage1-aux"),
    ]
    v += [Variant("frames", f"D = {d}", "stablesynth", {}, frames=d) for d in range(1, frames_per_clip + 1)]
    return v


def with_frames(data: FeatureBatch, d: int, seed: int) -> FeatureBatch:
    """The same clips with F_g averaged over ``d`` frames (a seeded choice per clip)."""
    n_f = data.frames.shape[1]
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n_f, generator=gen) for _ in range(len(data))])
    out = data.index(slice(None))
    out.global_index = order[:, :d].contiguous()
    return out


def _own_encoder(v: Variant, cfg: RunConfig, out: Path, log: Any, device: str) -> DemoRun:
    """The variant's demo run in ``out/ablate/<slug>``: its stage 1 and feature caches (reused when done)."""
    changed = v.run_config(cfg)
    assert changed is not None
    # Its stage 0, if any, comes from the cache the demo run uses (keyed by content).
    # Only the method it trains: no feature caches for the others (F-linear's untrained encoder).
    changed = changed.replace(stage0_cache=str(stage0_root(cfg, out)), methods=[v.method])
    run = DemoRun(changed, out / "ablate" / v.slug, reuse=True, log=log, device=device)
    run.stage1()
    run.cache_features()
    return run


#: What a paired difference to the defaults says, by its verdict.
_EFFECT = {"beats": "helps", "loses to": "hurts", "ties with": "no measurable effect (tie)"}


def run_ablation(cfg: RunConfig, out: Path, seeds: int = 3, only: list[str] | None = None,
                 log: Any = print, device: str = "cpu") -> dict[str, Any]:
    t0 = time.perf_counter()
    run = DemoRun(cfg, out, reuse=True, log=log, device=device)
    run.stage1()
    run.cache_features()
    todo = [v for v in variants(cfg.benchmark.frames_per_clip) if not only or v.group in only]
    todo = [v for v in todo if v.run_config(cfg) is not None]
    rows = []
    for v in tqdm(todo, desc="ablations", dynamic_ncols=True):
        ws = run.ws if not v.run else _own_encoder(v, cfg, out, log, device).ws
        scores, worsts, spreads, per_device, per_device_session = [], [], [], [], []
        for s in range(seeds):
            method = ws.method(v.method, overrides=v.overrides)
            train = ws.data("history", method.cfg.category, devices="train")
            test = ws.data("realtime", method.cfg.category)
            if v.frames is not None:
                train = with_frames(train, v.frames, seed=1 + s)
                test = with_frames(test, v.frames, seed=10_000 + s)
            c = method.cfg
            train_method(method, train, c.epochs, c.batch_size, c.lr, c.weight_decay, seed=cfg.seed + 101 * s,
                         desc=f"{v.name} seed {s}", device=ws.device)
            # Both modes, as the demo evaluates them: an upload per clip, and one at each session's start.
            modes = ws.evaluate(method, test)
            acc = {int(d): a for d, a in modes["per_sample"]["per_device"].items()}
            summary = per_device_summary(acc, ws.seen)["all"]
            per_device.append(acc)
            per_device_session.append(modes["per_session"]["per_device"])
            scores.append(summary["mean"])
            worsts.append(summary["worst"])
            spreads.append(summary["std"])
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((x - mean) ** 2 for x in scores) / max(1, len(scores) - 1)) if len(scores) > 1 else 0.0
        # Per device, the mean over seeds: the unit the intervals resample.
        device_mean = {str(d): sum(a[d] for a in per_device) / len(per_device) for d in per_device[0]}
        session_mean = {d: sum(a[d] for a in per_device_session) / len(per_device_session)
                        for d in per_device_session[0]}
        session_ci = bootstrap_mean_ci(list(session_mean.values()))
        row = {"group": v.group, "name": v.name, "method": v.method, "overrides": v.overrides, "frames": v.frames,
               "mean": mean, "std": std, "worst": sum(worsts) / len(worsts), "spread": sum(spreads) / len(spreads),
               "per_seed": scores, "per_device": device_mean, "ci": bootstrap_mean_ci(list(device_mean.values())),
               "session": {"mean": session_ci["mean"], "per_device": session_mean, "ci": session_ci}}
        rows.append(row)
        log(f"{v.name:>32}: {100 * mean:.1f} ± {100 * std:.1f} (worst {100 * row['worst']:.1f})")
    ref = rows[0] if rows and rows[0]["group"] == "reference" else None
    notes = []
    if ref is not None:
        # No "best variant": these are the scored clips, where nothing is chosen (bench tune chooses
        # on validation clips); each variant is only compared with the defaults, with its interval.
        for r in rows[1:]:
            r["vs_reference"] = diff = paired_difference(r["per_device"], ref["per_device"])
            r["session"]["vs_reference"] = s_diff = paired_difference(r["session"]["per_device"],
                                                                       ref["session"]["per_device"])
            notes.append(f"{r['name']}: {format_ci(diff)} points against the defaults per sample, "
                         f"{_EFFECT[verdict(diff)]}; {format_ci(s_diff)} per session, {_EFFECT[verdict(s_diff)]} "
                         f"(per-device difference, mean over {seeds} seeds, 95 % bootstrap interval over "
                         f"{diff['n']} devices).")
    ablation = {"n_seeds": seeds, "rows": rows, "notes": notes, "seconds": time.perf_counter() - t0}
    atomic_write_json(out / "ablation.json", ablation)
    plots.ablation_plot(ablation, out / "ablation.png")
    results_path = out / "results.json"
    if results_path.exists():
        write_outputs(json.loads(results_path.read_text()), out)
    log(f"ablations written to {out / 'ablation.json'} in {ablation['seconds']:.0f} s")
    return ablation
