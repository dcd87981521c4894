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


def summarise_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and group: the mean per seed, and the proposed method's pooled paired differences."""
    ours = proposed_method(runs[0])
    methods = list(runs[0]["methods"])
    out: dict[str, Any] = {"n_seeds": len(runs), "seeds": [r["config"]["benchmark"]["seed"] for r in runs],
                           "proposed": ours, "methods": {}}
    for name in methods:
        entry: dict[str, Any] = {"label": runs[0]["methods"][name]["label"]}
        for group in ("seen", "unseen"):
            per_seed = [r["methods"][name]["accuracy"]["per_sample"][group]["mean"] for r in runs]
            entry[group] = {"per_seed": per_seed, "ci": bootstrap_mean_ci(per_seed)}
            if ours is not None and name != ours:
                diffs: list[float] = []
                for r in runs:
                    devices = device_groups(r)[group]
                    a = r["methods"][ours]["accuracy"]["per_sample"]["per_device"]
                    b = r["methods"][name]["accuracy"]["per_sample"]["per_device"]
                    diffs += [a[d] - b[d] for d in devices if d in a and d in b]
                entry[group]["proposed_minus_this"] = bootstrap_mean_ci(diffs)
        out["methods"][name] = entry
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

