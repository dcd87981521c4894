"""PNG plots drawn from results.json (never from anything else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _labels(results: dict[str, Any]) -> list[str]:
    return list(results["methods"])


def per_device_accuracy(results: dict[str, Any], path: Path, mode: str = "per_sample") -> Path:
    """Grouped bars: accuracy of every method on every device, unseen devices hatched."""
    methods = _labels(results)
    devices = results["benchmark"]["devices"]
    ids = [str(d["id"]) for d in devices]
    width = 0.8 / (len(methods) + 1)
    fig, ax = plt.subplots(figsize=(max(8, len(ids) * 0.9), 4.5))
    series = [(m, results["methods"][m]["accuracy"][mode]["per_device"]) for m in methods]
    if results.get("oracle"):
        series.append(("per-device fine-tuning (oracle)", results["oracle"]["accuracy"]["per_device"]))
    for j, (name, per_dev) in enumerate(series):
        xs = [i + (j - len(series) / 2) * width for i in range(len(ids))]
        ys = [100 * per_dev.get(i, float("nan")) for i in ids]
        bars = ax.bar(xs, ys, width=width, label=results["methods"].get(name, {}).get("label", name))
        for bar, dev in zip(bars, devices):
            if not dev["seen"]:
                bar.set_hatch("//")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels([f"{d['id']}{'' if d['seen'] else '*'}" for d in devices])
    ax.set_xlabel("device (* = unseen in training, hatched)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Real-time accuracy per device ({mode.replace('_', ' ')} adaptation)")
    lo = min(100 * v for _, pd in series for v in pd.values()) if series else 0
    ax.set_ylim(max(0, lo - 10), 100)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_cost(results: dict[str, Any], path: Path) -> Path:
    """Two panels: mean accuracy against bytes downloaded (fp32) and against cloud FLOPs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in results["methods"].values():
        acc = 100 * m["accuracy"]["per_sample"]["all"]["mean"]
        down = m["bytes"]["down"]
        points = [("fp32", down["fp32"])]
        for enc in ("factors", "driver"):
            if down.get(enc):
                points.append((enc, down[enc]))
        xs = [p[1] for p in points]
        line = axes[0].plot(xs, [acc] * len(xs), "o-", label=m["label"])[0]
        for enc, x in points:
            axes[0].annotate(enc, (x, acc), fontsize=6, xytext=(3, 3), textcoords="offset points",
                             color=line.get_color())
        flops = max(1, m["flops"]["benchmark"])
        axes[1].scatter([flops], [acc], label=m["label"], s=40)
        axes[1].annotate(m["label"], (flops, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes downloaded per adaptation (log)")
    axes[0].set_ylabel("mean accuracy over devices (%)")
    axes[0].set_title("Accuracy vs download size")
    axes[1].set_xscale("log")
    axes[1].set_xlabel(f"cloud-step FLOPs per upload at K={results['benchmark']['num_classes']} (log)")
    axes[1].set_title("Accuracy vs cloud compute")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_plot(ablation: dict[str, Any], path: Path) -> Path:
    """Mean ± std accuracy of each ablation variant over seeds."""
    rows = ablation["rows"]
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(rows)), 4.2))
    xs = range(len(rows))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=3,
           color=["#4C72B0" if r["group"] != "reference" else "#DD8452" for r in rows])
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("mean accuracy over devices (%)")
    ax.set_title(f"Ablations ({ablation['n_seeds']} seeds, mean ± std)")
    lo = min(100 * (r["mean"] - r["std"]) for r in rows)
    ax.set_ylim(max(0, lo - 5), min(100, max(100 * (r["mean"] + r["std"]) for r in rows) + 3))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
