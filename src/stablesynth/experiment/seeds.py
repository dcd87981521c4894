"""`stablesynth demo --seeds N`: the headline over several benchmark seeds.

Seed 0's run is the main one (``out``); every further seed k draws another benchmark
(devices, casts, usage, clips) and trains everything again in ``out/seeds/<k>``. The
comparison pools the per-device differences of all seeds' devices, so its interval
covers both the devices and the benchmark draw. Written to ``seeds.json`` and rendered
into report.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stablesynth.evaluation.report import device_groups, proposed_method
from stablesynth.evaluation.stats import bootstrap_mean_ci
from stablesynth.experiment.demo import RunConfig, run_pipeline
from stablesynth.experiment.results import json_safe, write_outputs
from stablesynth.files import atomic_write_json

SEEDS_FILE = "seeds.json"


def seed_config(cfg: RunConfig, k: int) -> RunConfig:
    """The run config of benchmark seed ``cfg.benchmark.seed + k`` (and run seed ``cfg.seed + k``)."""
    return cfg.replace(seed=cfg.seed + k, benchmark=cfg.benchmark.replace(seed=cfg.benchmark.seed + k))


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, min, max and the 95 % bootstrap interval over seeds of one figure."""
    return {"per_seed": values, "min": min(values), "max": max(values), "ci": bootstrap_mean_ci(values)}


def _summarise_methods(runs: list[dict[str, Any]], methods_of: Callable[[dict[str, Any]], dict[str, Any]],
                       ours: str | None) -> dict[str, Any]:
    """Per method and group: its mean per seed with the spread, and ``ours`` − it over every seed's devices."""
    out: dict[str, Any] = {}
    names = [n for n in methods_of(runs[0]) if all(n in methods_of(r) for r in runs)]
    for name in names:
        entry: dict[str, Any] = {"label": methods_of(runs[0])[name]["label"]}
        for group in ("seen", "unseen"):
            per_seed = [methods_of(r)[name]["accuracy"]["per_sample"][group]["mean"] for r in runs]
            entry[group] = spread(per_seed)
            if ours is not None and ours in names and name != ours:
                diffs: list[float] = []
                for r in runs:
                    devices = device_groups(r)[group]
                    a = methods_of(r)[ours]["accuracy"]["per_sample"]["per_device"]
                    b = methods_of(r)[name]["accuracy"]["per_sample"]["per_device"]
                    diffs += [a[d] - b[d] for d in devices if d in a and d in b]
                entry[group]["proposed_minus_this"] = bootstrap_mean_ci(diffs)
        out[name] = entry
    return out


def summarise_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline of every seed's run: each method's spread over seeds and its pooled paired difference
    to the proposed method, for open-ended QA and for every caption task; the headroom per seed."""
    ours = proposed_method(runs[0])
    out: dict[str, Any] = {"n_seeds": len(runs), "seeds": [r["config"]["benchmark"]["seed"] for r in runs],
                           "proposed": ours, "methods": _summarise_methods(runs, lambda r: r["methods"], ours)}
    if all(r.get("informative") for r in runs):
        inf = [r["informative"] for r in runs]
        out["headroom"] = {
            "global_clean": spread([i["global_clean"] for i in inf]),
            **{f"{k}_{g}": spread([i[f"{k}_{g}"] for i in inf])
               for k in ("global", "oracle") for g in ("seen", "unseen")},
            **{f"oracle_minus_global_{g}": spread([i[f"oracle_{g}"] - i[f"global_{g}"] for i in inf])
               for g in ("seen", "unseen")},
        }
        if all(r.get("diagnostics") for r in runs):
            gains = [r["diagnostics"]["prior_corrected_unseen"] - r["diagnostics"]["global_unseen"] for r in runs]
            out["headroom"]["prior_gain_unseen"] = spread(gains)
            # A ratio of the means: one seed's headroom can be near zero, and its own ratio then means nothing.
            room = sum(i["oracle_unseen"] - i["global_unseen"] for i in inf) / len(inf)
            out["headroom"]["prior_share_unseen"] = sum(gains) / len(gains) / room if room > 0 else None
    tasks = [t for t in (runs[0].get("tasks") or {}) if all(t in (r.get("tasks") or {}) for r in runs)]
    if tasks:
        out["tasks"] = {t: {"methods": _summarise_methods(runs, lambda r, t=t: r["tasks"][t]["methods"], ours)}
                        for t in tasks}
    return out


def run_seeds(cfg: RunConfig, out: Path, n_seeds: int, reuse: bool = True, log: Callable[[str], None] = print,
              device: str = "cpu") -> dict[str, Any]:
    """Seed 0 in ``out``, seeds 1..n−1 in ``out/seeds/<k>``; writes seeds.json and the main report again."""
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    out = Path(out)
    runs = [run_pipeline(cfg, out, reuse=reuse, log=log, device=device)]
    if n_seeds == 1:
        return runs[0]
    for k in range(1, n_seeds):
        log(f"benchmark seed {cfg.benchmark.seed + k} ({k + 1} of {n_seeds})")
        runs.append(run_pipeline(seed_config(cfg, k), out / "seeds" / str(k), reuse=reuse, log=log, device=device))
    atomic_write_json(out / SEEDS_FILE, json_safe(summarise_seeds(runs)))
    write_outputs(runs[0], out, plots_too=False)
    return runs[0]

