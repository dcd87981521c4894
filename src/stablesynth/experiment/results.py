"""results.json I/O shared by every run: versions, the common skeleton, JSON safety, writing outputs."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

import stablesynth
from stablesynth.evaluation import plots
from stablesynth.evaluation.report import render_report
from stablesynth.evaluation.schema import SCHEMA_VERSION, validate_results
from stablesynth.files import atomic_write_json, atomic_write_text
from stablesynth.methods import Method
from stablesynth.models.payload import payload_table

FIGURES = ("per_device_accuracy.png", "accuracy_vs_cost.png")


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


def json_safe(obj: Any) -> Any:
    """NaN/inf → null and tuple → list, recursively: what strict JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def method_entry(method: Method, train_seconds: float) -> dict[str, Any]:
    """The part of ``methods.<name>`` that the method's class says about itself."""
    entry = {"label": method.label, "adaptive": bool(method.adaptive), "proposed": bool(method.proposed),
             "train_seconds": train_seconds, "config": method.cfg.to_dict()}
    if (on_device := method.on_device()) is not None:
        entry["on_device"] = on_device
    return entry


def log_accuracy(log: Any, entry: dict[str, Any], extra: str = "") -> None:
    acc = entry["accuracy"]["per_sample"]
    log(f"{entry['label']:>15}: seen {100 * acc['seen']['mean']:.1f}  unseen {100 * acc['unseen']['mean']:.1f}"
        f"  worst {100 * acc['all']['worst']:.1f}  std {100 * acc['all']['std']:.1f}{extra}")


def results_skeleton(*, t0: float, seed: int, command: str, config: dict[str, Any], stage1_info: dict[str, Any],
                     timings: dict[str, float], methods: dict[str, Any], paper: dict[str, Any]) -> dict[str, Any]:
    """The keys every results.json has, in the documented order."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t0,
        "versions": versions(),
        "seed": seed,
        "command": command,
        "config": config,
        "stage1": {"history": stage1_info.get("history", []), "seconds": stage1_info.get("seconds", 0.0)},
        "timings": timings,
        "methods": methods,
        "paper": paper,
        "payload": payload_table(),
    }


def write_outputs(results: dict[str, Any], out: Path, plots_too: bool = True) -> None:
    """results.json, report.md (with the ablations when ``out`` has them) and the plots."""
    validate_results(results)
    ablation_path, seeds_path = out / "ablation.json", out / "seeds.json"
    ablation = json.loads(ablation_path.read_text()) if ablation_path.exists() else None
    seeds = json.loads(seeds_path.read_text()) if seeds_path.exists() else None
    atomic_write_json(out / "results.json", results)
    if plots_too and results["methods"]:
        plots.per_device_accuracy(results, out / "per_device_accuracy.png")
        plots.accuracy_vs_cost(results, out / "accuracy_vs_cost.png")
    atomic_write_text(out / "report.md", render_report(results, ablation, seeds))
