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
    """A methods × devices heat map of real-time accuracy (unseen devices starred), values printed."""
    devices = results["benchmark"]["devices"]
    ids = [str(d["id"]) for d in devices]
    rows = [(m["label"], m["accuracy"][mode]["per_device"]) for m in results["methods"].values()]
    if results.get("oracle"):
        rows.append(("per-device fine-tuning", results["oracle"]["accuracy"]["per_device"]))
    grid = [[100 * per_dev.get(i, float("nan")) for i in ids] for _, per_dev in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.42 * len(ids) + 3), 0.55 * len(rows) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=max(0, min(min(r) for r in grid) - 5), vmax=100)
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white" if v < 80 else "black")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([name for name, _ in rows], fontsize=8)
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels([f"{d['id']}{'' if d['seen'] else '*'}" for d in devices], fontsize=7)
    ax.set_xlabel("device (* = never seen in training)")
    ax.set_title(f"Real-time accuracy (%) per device, {mode.replace('_', '-')} adaptation")
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_cost(results: dict[str, Any], path: Path) -> Path:
    """Accuracy against bytes downloaded per adaptation, and against the cloud step's FLOPs.

    Only adaptive methods download anything per upload; the global heads are drawn as lines.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    K = results["benchmark"]["num_classes"]
    for m in results["methods"].values():
        acc = 100 * m["accuracy"]["per_sample"]["all"]["mean"]
        if not m["adaptive"]:
            for ax in axes:
                ax.axhline(acc, ls="--", lw=1, color="grey")
                ax.annotate(f"{m['label']} (no per-upload step)", (0.01, acc), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", xytext=(0, 2), textcoords="offset points")
            continue
        if m.get("encodings"):
            pts = sorted((e["bytes"], 100 * e["accuracy"], n) for n, e in m["encodings"].items())
        else:
            pts = [(m["bytes"]["down"]["fp32"], acc, "fp32")]
        line = axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m["label"], ms=4)[0]
        for x, y, name in pts:
            axes[0].annotate(name, (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points",
                             color=line.get_color(), rotation=30)
        color = line.get_color()
        axes[1].scatter([m["flops"]["benchmark"]], [acc], color=color, s=40, label=f"{m['label']} (K={K})")
        axes[1].scatter([m["flops"]["paper"]], [acc], facecolors="none", edgecolors=color, s=40,
                        label=f"{m['label']} (K={m['flops']['paper_K']})")
    axes[1].axvline(0.62e6, ls=":", color="black", lw=1)
    axes[1].annotate("paper: 0.62 M", (0.62e6, 0.02), xycoords=("data", "axes fraction"), fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes downloaded per adaptation, wire format incl. header (log)")
    axes[0].set_ylabel("mean accuracy over devices (%)")
    axes[0].set_title("Accuracy vs download (measured per encoding)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("cloud-step FLOPs per upload (filled: benchmark K, hollow: paper K)")
    axes[1].set_title("Accuracy vs cloud compute")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax, size in zip(axes, (7, 6)):
        if ax.get_legend_handles_labels()[0]:  # a run whose methods have no FLOP count has nothing to list
            ax.legend(fontsize=size, loc="lower right")
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
