"""`stablesynth bench devices`: how unseen-device accuracy grows with the number of seen devices.

At a **fixed total** of history clips the cloud trains on 8, 16, ..., 256 seen devices (so the
more devices, the fewer clips each), always scored on ``n_unseen`` devices it never saw, over
several benchmark seeds. The encoder is the stage-0 one (clean pretraining), frozen, so each point
costs one pass of feature extraction and stage 2 on cached features: the global head (Fine-tuning)
is the static MLP and last layer trained on the point's history features, and every other method
starts from it as in the demo. The best on-device method of a point is the one whose chosen
setting scored best on that point's validation clips (never the scored real-time clips).
Each point draws its own benchmark, so its unseen cameras differ from the next point's: absolute
accuracy moves with that draw, and the comparison is each method minus the global head, paired
over the same unseen devices within a point and pooled over the seeds.

Each finished point is written to ``points/`` at once, so an interrupted run resumes where it
stopped; ``devices.json`` and ``devices.png`` are written at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stablesynth.checkpoint import save_module
from stablesynth.data.easyvqa import load_easyvqa
from stablesynth.evaluation.stats import bootstrap_mean_ci
from stablesynth.experiment.demo import DemoRun, RunConfig, check_method_names
from stablesynth.files import atomic_write_json
from stablesynth.methods import METHODS

DEFAULT_COUNTS: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
#: The methods every point trains and scores; the on-device ones are the session-causal ones.
DEFAULT_METHODS: tuple[str, ...] = ("fine_tune", "f_hyper", "stablesynth", "stage2_control",
                                    "em_prior", "label_shift", "t3a", "tent_sar")
#: The fewest history clips a seen device may keep (a few for validation, the rest to train on).
MIN_CLIPS_PER_DEVICE = 6
DEVICES_FILE = "devices.json"
PLOT_FILE = "devices.png"


def check_grid(counts: Sequence[int], seeds: int, total_history: int, n_unseen: int, methods: Sequence[str],
               available_clips: int) -> None:
    """Refuse a grid the data cannot give before anything runs; each error names the value."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    if n_unseen < 1:
        raise ValueError(f"--unseen {n_unseen}: must be >= 1")
    if not counts:
        raise ValueError("--counts: give at least one number of seen devices")
    if len(set(counts)) != len(counts):
        raise ValueError(f"--counts {list(counts)}: a count appears twice")
    for n in counts:
        if n < 2:
            raise ValueError(f"--counts {n}: at least 2 seen devices per point")
        if total_history // n < MIN_CLIPS_PER_DEVICE:
            raise ValueError(f"--counts {n}: {total_history} history clips leave {total_history // n} per device, "
                             f"fewer than {MIN_CLIPS_PER_DEVICE} (raise --total-history or drop the count)")
    if total_history > available_clips:
        raise ValueError(f"--total-history {total_history}: easy-VQA's train split has only {available_clips} "
                         "questions to draw history clips from")
    check_method_names(list(methods), {})


def point_config(base: RunConfig, count: int, seed: int, total_history: int, n_unseen: int,
                 realtime_per_device: int, methods: Sequence[str]) -> RunConfig:
    """The run config of one point: ``count`` seen devices sharing ``total_history`` clips, benchmark seed ``seed``."""
    per_device = total_history // count
    bench = base.benchmark.replace(seed=base.benchmark.seed + seed, n_devices=count + n_unseen, n_unseen=n_unseen,
                                   history_per_device=per_device, realtime_per_device=realtime_per_device,
                                   validation_per_device=max(1, per_device // 6))
    return base.replace(seed=base.seed + seed, benchmark=bench, methods=list(methods), tasks=["qa"],
                        shape_probe_per_device=0, oracle=base.oracle.replace(enabled=False))


def run_point(cfg: RunConfig, out: Path, log: Callable[[str], None], device: str = "cpu") -> dict[str, Any]:
    """Features with the frozen stage-0 encoder, the global head on them, then every method; unseen accuracy."""
    t0 = time.perf_counter()
    run = DemoRun(cfg, out, reuse=False, log=log, device=device)
    ws = run.ws
    # The encoder is never trained here: its features are the stage-0 ones for every method.
    ws.rows = {"history": run.cache_split("trained", ws.model.encoder, "history", "seen"),
               "realtime": run.cache_split("trained", ws.model.encoder, "realtime", "unseen")}
    ws.rows["init_history"], ws.rows["init_realtime"] = ws.rows["history"], ws.rows["realtime"]
    save_module(out / "stage1", ws.model, {"kind": "stage1", "encoder": "stage 0, frozen"})
    head, seconds = ws.train_or_load("f_linear")
    with torch.no_grad():
        ws.model.static.load_state_dict(head.static.state_dict())
        ws.model.classifier.weight.copy_(head.weight)
        ws.model.classifier.bias.copy_(head.bias)
    save_module(out / "stage1", ws.model, {"kind": "stage1", "encoder": "stage 0, frozen",
                                          "head": "trained on the history features"})
    ws.stage1_info = {"seconds": seconds}
    rt = ws.data("realtime")
    scores: dict[str, Any] = {}
    for name in cfg.methods:
        method, _ = ws.train_or_load(name)
        acc = ws.evaluate(method, rt)
        entry = {"label": method.label, "unseen": acc["per_sample"]["unseen"]["mean"],
                 "unseen_per_session": acc["per_session"]["unseen"]["mean"],
                 "per_device": acc["per_sample"]["per_device"], "on_device": method.session_causal}
        if (dev := method.on_device()) is not None:
            entry["validation"] = max((dev.get("validation_accuracy") or {"": float("nan")}).values())
            entry["hyper"] = dev["hyper"]
        scores[name] = entry
    on_device = [n for n, e in scores.items() if e["on_device"] and e.get("validation") == e.get("validation")]
    best = max(on_device, key=lambda n: scores[n]["validation"]) if on_device else None
    return {"count": cfg.benchmark.n_devices - cfg.benchmark.n_unseen, "seed": cfg.benchmark.seed,
            "history_per_device": cfg.benchmark.history_per_device, "methods": scores, "best_on_device": best,
            "seconds": time.perf_counter() - t0}


def summarise(points: list[dict[str, Any]], counts: Sequence[int], methods: Sequence[str]) -> dict[str, Any]:
    """Per count and method: unseen accuracy over seeds (mean, min, max, interval); the best on-device
    method's too; and each method minus the global head, paired over the unseen devices of every seed."""
    rows: dict[str, Any] = {}
    series = [*methods, "best_on_device"]
    for n in counts:
        at = [p for p in points if p["count"] == n]
        row: dict[str, Any] = {"seeds": len(at), "history_per_device": at[0]["history_per_device"] if at else None}
        for name in series:
            entries = [p["methods"][p["best_on_device"]] if name == "best_on_device" and p["best_on_device"]
                       else p["methods"].get(name) for p in at]
            entries = [e for e in entries if e is not None]
            if not entries:
                continue
            values = [e["unseen"] for e in entries]
            diffs = [e["per_device"][d] - p["methods"]["fine_tune"]["per_device"][d]
                     for p, e in zip(at, entries, strict=True) for d in e["per_device"]]
            row[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                         "per_seed": values, "minus_global": bootstrap_mean_ci(diffs)}
            if name == "best_on_device":
                row[name]["chosen"] = [p["best_on_device"] for p in at]
        rows[str(n)] = row
    return {"counts": list(counts), "methods": list(methods), "labels": {n: METHODS.get(n).label for n in methods},
            "rows": rows}


def plot(summary: dict[str, Any], path: Path, shown: Sequence[str]) -> None:
    """Left: unseen accuracy per method (mean over seeds, band min–max). Right: each method minus the
    global head, paired over the unseen devices of every seed (band: 95 % interval); the unseen devices
    differ from one point to the next, so the right panel is the comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    counts = summary["counts"]
    labels = {**summary["labels"], "best_on_device": "best on-device method (chosen on validation)"}
    for i, name in enumerate(shown):
        pts = [(n, summary["rows"][str(n)][name]) for n in counts if name in summary["rows"][str(n)]]
        if not pts:
            continue
        xs = [n for n, _ in pts]
        colour = f"C{i}"
        ax.plot(xs, [100 * r["mean"] for _, r in pts], marker="o", color=colour, label=labels.get(name, name))
        ax.fill_between(xs, [100 * r["min"] for _, r in pts], [100 * r["max"] for _, r in pts], color=colour,
                        alpha=0.12)
        if name == "fine_tune":
            continue
        bx.plot(xs, [100 * r["minus_global"]["mean"] for _, r in pts], marker="o", color=colour,
                label=labels.get(name, name))
        bx.fill_between(xs, [100 * r["minus_global"]["low"] for _, r in pts],
                        [100 * r["minus_global"]["high"] for _, r in pts], color=colour, alpha=0.12)
    bx.axhline(0.0, color="k", lw=0.8)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xticks(counts, [str(n) for n in counts])
        a.set_xlabel("seen devices (fixed total of history clips)")
        a.grid(alpha=0.3)
    ax.set_ylabel("unseen-device accuracy (%)")
    ax.set_title("Unseen devices (mean over seeds, band: min–max)", fontsize=10)
    bx.set_ylabel("minus the global head (points)")
    bx.set_title("Gain over the global head, paired per device (band: 95 % interval)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_devices_bench(base: RunConfig, out: Path, counts: Sequence[int] = DEFAULT_COUNTS, seeds: int = 3,
                      total_history: int = 3840, n_unseen: int = 16, realtime_per_device: int = 60,
                      methods: Sequence[str] = DEFAULT_METHODS, log: Callable[[str], None] = print,
                      device: str = "cpu") -> dict[str, Any]:
    """Every (count, seed) point, resumable; writes devices.json and devices.png into ``out``."""
    check_grid(counts, seeds, total_history, n_unseen, methods, len(load_easyvqa().train.questions))
    if "fine_tune" not in methods:
        raise ValueError("--methods must include fine_tune (the global head every difference is taken to)")
    out = Path(out)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    grid = [(s, n) for s in range(seeds) for n in counts]
    points: list[dict[str, Any]] = []
    quiet: list[str] = []
    bar = tqdm(grid, desc="bench devices", dynamic_ncols=True)
    for s, n in bar:
        bar.set_postfix_str(f"{n} devices, seed {s}")
        path = points_dir / f"n{n}-s{s}.json"
        cfg = point_config(base, n, s, total_history, n_unseen, realtime_per_device, methods)
        if path.exists():
            point = json.loads(path.read_text())
            if point.get("config") == cfg.to_dict():
                points.append(point)
                continue
        work = out / "work" / f"n{n}-s{s}"
        point = run_point(cfg, work, log=quiet.append, device=device)
        point["config"] = cfg.to_dict()
        atomic_write_json(path, point)
        shutil.rmtree(work, ignore_errors=True)  # the features are large; the point's figures are kept
        points.append(point)
        log(f"{n:>4} devices, seed {s}: " + ", ".join(
            f"{point['methods'][m]['label']} {100 * point['methods'][m]['unseen']:.1f}" for m in methods)
            + f" ({point['seconds']:.0f} s)")
    summary = {**summarise(points, counts, methods), "seeds": seeds, "total_history": total_history,
               "n_unseen": n_unseen, "realtime_per_device": realtime_per_device,
               "base_config": base.to_dict(), "seconds": time.perf_counter() - t0,
               # What the points cost when they were run (a resumed run reads them in seconds).
               "point_seconds": sum(float(p["seconds"]) for p in points)}
    atomic_write_json(out / DEVICES_FILE, summary)
    plot(summary, out / PLOT_FILE, ["fine_tune", "stablesynth", "f_hyper", "stage2_control", "best_on_device"])
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Unseen accuracy per count, and each method minus the global head with its interval."""
    names = [*summary["methods"], "best_on_device"]
    labels = {**summary["labels"], "best_on_device": "best on-device"}
    lines = ["| seen devices | clips each | " + " | ".join(labels[n] for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for n in summary["counts"]:
        row = summary["rows"][str(n)]
        cells = []
        for name in names:
            r = row.get(name)
            if r is None:
                cells.append("—")
                continue
            d = r["minus_global"]
            diff = ("" if name == "fine_tune"
                    else f" ({100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}])")
            cells.append(f"{100 * r['mean']:.1f}{diff}")
        lines.append(f"| {n} | {row['history_per_device']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
