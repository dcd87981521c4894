"""results.json: its schema, validation and loading. Every figure report.md prints is read from it.

Schema (version 1), all accuracies are fractions in [0, 1]:

```
schema_version, created, wall_seconds, versions{}, seed, command, config{}
stage0: {checkpoint, clean_test{}, train_seconds, seconds} or null          (stage-0 pretraining)
benchmark: num_classes, answers[], devices[{id, seen, ...}], counts{}, accuracy_convention
stage1: history[{epoch, loss, train_accuracy, seconds}], seconds
informative: {global_clean, global_seen, global_unseen, global_validation?, oracle_seen, oracle_unseen, verdict,
              by_question_type{<type>: {mean, worst, worst_device, worst_n, worst_low, worst_high,
                                         goal, devices, below_goal, clearly_below_goal, clearly_above_goal?}},
              shape_probe?{the same, question_type, per_device, seconds}}  (DESIGN §5)
diagnostics: {device_probe_accuracy, chance, global_<g>, prior_corrected_<g>}   g = seen, unseen
methods.<name>:
  label, adaptive, proposed, train_seconds, config{}
  accuracy.<per_sample|per_session>: per_device{id: acc}, seen|unseen|all{mean, worst, std, n}
  params: {cloud, device_static}
  flops: {benchmark, paper, benchmark_K, paper_K}           cloud step, one upload
  bytes: {up, down{fp32, fp16, int8, factors?, driver?}}
  adapt_ms: {median, p90, repeats}                           upload → device model that predicts
  device_ms_per_clip?                                        on-device adaptation alone (no upload)
  on_device?: {correction, label, backprop, hyper{}, validation_accuracy{}}   a correction the device runs
  device_cost?: {ms_per_clip, flops_per_clip, state_bytes, session_clips, backprop}   its cost per clip
  encodings?{<encoding>: {bytes, accuracy, delta_points, device_ms, ...}}   the proposed method only
oracle: accuracy{per_device, seen, unseen, all}, finetune_seconds{median, per_device}
payload: rows of the paper presets' payload table
tasks.<mc|ret>:                                    multiple choice / retrieval on captions (demo --task)
  devices[], clips, clips_per_device, captions, train_rows, stage1{}, timings{}, seconds, paper{}
  chance                                           mc: a fraction; ret: {session|pooled: {seen|unseen: {VR@k, TR@k}}}
  methods.<name>: as above (accuracy: mc per-device accuracy, ret per-device session VR@1), plus
    mc: all;  ret: session{seen|unseen: {VR@k, TR@k}}, pooled{seen|unseen: {...}}; per_session{the same}
  oracle: {accuracy, finetune_seconds, ...} or null
methods is empty when a run measured only tasks.
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class ResultsSchemaError(ValueError):
    """results.json does not follow the documented schema; the message names the path."""


def _need(obj: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ResultsSchemaError(f"{where}.{key} is missing")
    value = obj[key]
    if not isinstance(value, kind):
        raise ResultsSchemaError(f"{where}.{key} should be {kind}, got {type(value).__name__}")
    return value


def _check_fraction(v: Any, where: str) -> None:
    if not isinstance(v, int | float) or not (0.0 <= v <= 1.0):
        raise ResultsSchemaError(f"{where} should be a fraction in [0, 1], got {v!r}")


def _check_accuracy_block(block: dict[str, Any], where: str) -> None:
    per_dev = _need(block, "per_device", where, dict)
    for dev, acc in per_dev.items():
        _check_fraction(acc, f"{where}.per_device.{dev}")
    for group in ("seen", "unseen", "all"):
        summary = _need(block, group, where, dict)
        n = _need(summary, "n", f"{where}.{group}", int)
        for key in ("mean", "worst", "std"):
            # An empty group (n = 0) has no statistics: null (NaN is not JSON).
            _need(summary, key, f"{where}.{group}", (int, float) if n else (int, float, type(None)))


def validate_results(results: dict[str, Any]) -> None:
    """Raise :class:`ResultsSchemaError` unless ``results`` follows the schema above."""
    if _need(results, "schema_version", "results", int) != SCHEMA_VERSION:
        raise ResultsSchemaError(f"results.schema_version should be {SCHEMA_VERSION}")
    for key, kind in (("created", str), ("wall_seconds", (int, float)), ("versions", dict),
                      ("config", dict), ("benchmark", dict), ("methods", dict), ("stage1", dict)):
        _need(results, key, "results", kind)
    bench = results["benchmark"]
    _need(bench, "num_classes", "benchmark", int)
    devices = _need(bench, "devices", "benchmark", list)
    ids = {str(d["id"]) for d in devices}
    tasks = results.get("tasks") or {}
    if not results["methods"] and not tasks:
        raise ResultsSchemaError("results.methods is empty")
    _check_methods(results["methods"], ids, "methods")
    for task, entry in tasks.items():
        where = f"tasks.{task}"
        methods = _need(entry, "methods", where, dict)
        if not methods:
            raise ResultsSchemaError(f"{where}.methods is empty")
        _check_methods(methods, ids, f"{where}.methods")
        _need(entry, "chance", where, (int, float, dict))
        if entry.get("oracle"):
            block = _need(entry["oracle"], "accuracy", f"{where}.oracle", dict)
            _check_accuracy_block(block, f"{where}.oracle.accuracy")
    if results.get("oracle"):
        _check_accuracy_block(_need(results["oracle"], "accuracy", "oracle", dict), "oracle.accuracy")
        _need(results["oracle"], "finetune_seconds", "oracle", dict)


def _check_methods(methods: dict[str, Any], ids: set[str], prefix: str) -> None:
    for name, m in methods.items():
        where = f"{prefix}.{name}"
        _need(m, "label", where, str)
        _need(m, "adaptive", where, bool)
        acc = _need(m, "accuracy", where, dict)
        for mode in ("per_sample", "per_session"):
            block = _need(acc, mode, f"{where}.accuracy", dict)
            _check_accuracy_block(block, f"{where}.accuracy.{mode}")
            missing = ids - set(block["per_device"])
            if missing:
                raise ResultsSchemaError(f"{where}.accuracy.{mode}.per_device lacks devices {sorted(missing)}")
        params = _need(m, "params", where, dict)
        _need(params, "cloud", f"{where}.params", int)
        flops = _need(m, "flops", where, dict)
        for key in ("benchmark", "paper", "benchmark_K", "paper_K"):
            _need(flops, key, f"{where}.flops", int)
        by = _need(m, "bytes", where, dict)
        _need(by, "up", f"{where}.bytes", int)
        down = _need(by, "down", f"{where}.bytes", dict)
        for enc in ("fp32", "fp16", "int8"):
            _need(down, enc, f"{where}.bytes.down", int)
        adapt = _need(m, "adapt_ms", where, dict)
        _need(adapt, "median", f"{where}.adapt_ms", (int, float))


def load_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ResultsSchemaError(f"{path} is not valid JSON: {exc}") from exc
    validate_results(results)
    return results
