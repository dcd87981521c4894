"""`stablesynth bench tune`: stage-2 hyper-parameters chosen on validation clips, never on the test.

The validation clips are each seen device's last ``benchmark.validation_per_device`` history
clips: stage 1 and stage 2 never train on them, and the real-time clips the report scores
play no part here. Every candidate trains on the remaining history and is scored, per
device, on the validation clips; the best mean wins, and ``tune.json`` records every
candidate so that the choice can be checked (docs/choices.md lists what was chosen).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stablesynth.evaluation.metrics import accuracy_by_device
from stablesynth.evaluation.stats import bootstrap_mean_ci
from stablesynth.experiment.demo import DemoRun, RunConfig
from stablesynth.files import atomic_write_json
from stablesynth.training.stage2 import predict_per_sample, train_method

#: The grid searched per method: the knobs the paper leaves open or sets for other data.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "f_hyper": {"lr": [1e-4, 3e-4, 1e-3], "epochs": [20, 40]},
    "duet": {"lr": [1e-4, 3e-4, 1e-3], "epochs": [20, 40]},
    "stablesynth": {"lr": [1e-4, 3e-4, 1e-3], "epochs": [20, 40], "lambda_f": [0.3, 0.5]},
}


def candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def run_tuning(cfg: RunConfig, out: Path, methods: list[str] | None = None, log: Callable[[str], None] = print,
               device: str = "cpu") -> dict[str, Any]:
    """Train every candidate of every method's grid; score each on the validation clips."""
    if cfg.benchmark.validation_per_device == 0:
        raise ValueError("benchmark.validation_per_device is 0: there are no validation clips to tune on")
    t0 = time.perf_counter()
    run = DemoRun(cfg, out, reuse=True, log=log, device=device)
    run.stage1()
    run.cache_features()
    ws = run.ws
    report: dict[str, Any] = {"validation_per_device": cfg.benchmark.validation_per_device, "methods": {}}
    for name in methods or list(GRIDS):
        rows = []
        for over in tqdm(candidates(GRIDS[name]), desc=f"tune {name}", dynamic_ncols=True):
            method = ws.method(name, overrides=over)
            c = method.cfg
            train = ws.data("history", c.category, devices="train")
            val = ws.data("history", c.category, devices="validation")
            method.prepare(train, val)
            train_method(method, train, c.epochs, c.batch_size, c.lr, c.weight_decay, seed=cfg.seed,
                         desc=f"{name} {over}", device=ws.device)
            preds = predict_per_sample(method, val, device=ws.device)
            acc = accuracy_by_device(preds, val.label, val.device)
            ci = bootstrap_mean_ci(list(acc.values()))
            rows.append({"overrides": over, "validation": ci})
            log(f"{name} {over}: validation {100 * ci['mean']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]")
        best = max(rows, key=lambda r: r["validation"]["mean"])
        report["methods"][name] = {"candidates": rows, "chosen": best["overrides"]}
        log(f"{name}: chosen {best['overrides']} ({100 * best['validation']['mean']:.1f} on validation)")
    report["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "tune.json", report)
    return report
