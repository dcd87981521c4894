"""A picture of the benchmark's devices: one scene as every device's camera records it.

Used by ``stablesynth data describe`` and the demo to show the capture profiles and their
drift between the history and the real-time session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from stablesynth.data.benchmark import DeviceBenchmark
from stablesynth.data.benchmark_config import BENCH_SPLITS
from stablesynth.data.devices import CaptureProfile, capture_clips


def devices_grid_png(
    benchmark: DeviceBenchmark,
    path: str | Path,
    scenes: Sequence[int] | None = None,
    size: int = 64,
) -> Path:
    """Draw one scene (or a few) as every device's camera records it, in its history and its
    real-time session, with the clean scene first; write a PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = benchmark.data.train
    if scenes is None:
        scenes = _default_scenes(benchmark)
    scenes = [int(s) for s in scenes]
    for s in scenes:
        if not 0 <= s < train.images.shape[0]:
            raise ValueError(f"scene {s} is not an easy-VQA train image index")
    n_dev = len(benchmark.devices)
    images = train.images[scenes]
    seeds = torch.zeros(len(scenes), dtype=torch.long)
    clean = capture_clips(
        images, CaptureProfile.identity().to_tensor().expand(len(scenes), -1).contiguous(), seeds, 1, size, None
    )[:, 0]
    rows = []  # (label, [n_dev] images)
    for s_i, s in enumerate(scenes):
        for split in BENCH_SPLITS:
            params = benchmark.profile_params(split)
            imgs = images[s_i : s_i + 1].expand(n_dev, -1, -1, -1).contiguous()
            frames = capture_clips(imgs, params, torch.arange(n_dev, dtype=torch.long) + 7919 * s, 1, size, None)
            rows.append((f"{_scene_label(benchmark, s)}\n{split}", clean[s_i], frames[:, 0]))

    fig, axes = plt.subplots(len(rows), n_dev + 1, figsize=(1.25 * (n_dev + 1), 1.45 * len(rows) + 0.4), squeeze=False)
    for r, (label, ref, frames) in enumerate(rows):
        axes[r, 0].imshow(ref.permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(label, fontsize=7)
        if r == 0:
            axes[r, 0].set_title("clean", fontsize=8)
        for d in range(n_dev):
            ax = axes[r, d + 1]
            ax.imshow(frames[d].permute(1, 2, 0).numpy())
            if r == 0:
                dev = benchmark.devices[d]
                ax.set_title(f"dev {d}" + ("" if dev.seen else "\n(unseen)"), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"easy-VQA scenes as each device captures them (seed {benchmark.cfg.seed})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scene_label(benchmark: DeviceBenchmark, image: int) -> str:
    train = benchmark.data.train
    idx = (train.image == image).nonzero().squeeze(1).tolist()
    color = shape = "?"
    for q in idx:
        t = int(train.question_type[q])
        if t == 1:
            color = benchmark.data.answers[int(train.answer[q])]
        elif t == 0:
            shape = benchmark.data.answers[int(train.answer[q])]
    return f"{color} {shape}"


def _default_scenes(benchmark: DeviceBenchmark) -> list[int]:
    """Two train scenes whose shapes have different, cast-sensitive colours (first found)."""
    train = benchmark.data.train
    want = ("gray", "teal")
    out = []
    for colour in want:
        a = benchmark.data.answers.index(colour) if colour in benchmark.data.answers else -1
        hits = ((train.question_type == 1) & (train.answer == a)).nonzero().squeeze(1)
        if len(hits):
            out.append(int(train.image[hits[0]]))
    return out or [0]
