"""Stage 2: the one training loop every method shares, over cached features.

The loop owns the optimizer (AdamW, built once per run) and the batches; methods
only say what their loss is (``Method.loss``) and what happens after a step.

Every function takes a ``device`` (default CPU): the method is moved there (and stays),
the cached features follow batch by batch, predictions come back on CPU. Stage 2 stays
in fp32 on every device (its contrastive loss takes arccos of cosines). Batch order is
drawn on CPU from the same generator, so a GPU run sees the CPU run's batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from stablesynth.accelerator import resolve_device, to_device
from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.base import Method


def paired_batches(categories: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of batches in which each drawn anchor brings one partner of its category.

    Eq. 5's positives must exist in a batch: half of each batch are random anchors, the
    other half a random *other* sample of each anchor's category. An anchor alone in its
    category brings no partner (it has no positive, and Eq. 5–8 leave it out); a sample is
    never its own partner, which would be a trivial positive and a duplicated row.
    """
    n = int(categories.shape[0])
    order = torch.randperm(n, generator=generator)
    half = max(1, batch_size // 2)
    by_cat: dict[int, torch.Tensor] = {}
    for c in categories.unique().tolist():
        by_cat[int(c)] = torch.nonzero(categories == c).flatten()
    for start in range(0, n, half):
        anchors = order[start:start + half]
        partners = []
        for a in anchors.tolist():
            pool = by_cat[int(categories[a])]
            if len(pool) < 2:
                continue
            # Uniform over the other len(pool) − 1 members: pool is sorted, so slots at or past the
            # anchor's own shift by one.
            k = int(torch.randint(len(pool) - 1, (1,), generator=generator))
            partners.append(int(pool[k + 1]) if int(pool[k]) >= a else int(pool[k]))
        yield torch.cat([anchors, torch.tensor(partners, dtype=torch.long)])


def train_method(
    method: Method,
    data: FeatureBatch,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    desc: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train ``method`` on ``data`` with AdamW; returns per-epoch mean logs and seconds."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    method.to(dev)
    if dev.type != "cpu":
        data = to_device(data, dev)
    params = list(method.trainable_parameters())
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    if not params or epochs == 0:
        return {"history": history, "seconds": 0.0, "steps": 0}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    bar = tqdm(range(epochs), desc=desc or f"stage 2 {method.name}", leave=False, dynamic_ncols=True)
    for epoch in bar:
        sums: dict[str, float] = {}
        count = 0
        for idx in paired_batches(data.category.cpu(), batch_size, gen):
            logs = method.update(data.index(idx.to(dev)), optimizer)
            for k, v in logs.items():
                if v != v or v in (float("inf"), float("-inf")):
                    raise FloatingPointError(f"{method.name}: {k} became {v} at epoch {epoch + 1}")
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            steps += 1
        record = {"epoch": epoch + 1, **{k: v / max(count, 1) for k, v in sums.items()}}
        history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"})
    bar.close()
    return {"history": history, "seconds": time.perf_counter() - t0, "steps": steps}


@torch.inference_mode()
def predict_per_sample(method: Method, data: FeatureBatch, batch_size: int = 1024,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample mode: each clip is predicted with Θ_d generated from its own uploaded frame.

    Runs on ``device`` (the method is moved there); the predictions are returned on CPU.
    """
    dev = resolve_device(device)
    method.to(dev)
    method.eval()
    out = []
    for start in range(0, len(data), batch_size):
        chunk = data.index(slice(start, start + batch_size))
        if dev.type != "cpu":
            chunk = to_device(chunk, dev, non_blocking=True)
        out.append(method(chunk).argmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.inference_mode()
def predict_per_session(method: Method, data: FeatureBatch, session_upload: int = 0,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-session mode: a device uploads one frame once and reuses Θ_d for all its clips.

    ``data`` holds one device's real-time clips in capture order; clip
    ``session_upload`` supplies the single upload. Runs on ``device``; returns CPU predictions.
    """
    dev = resolve_device(device)
    method.to(dev)
    method.eval()
    if dev.type != "cpu":
        data = to_device(data, dev)
    first = data.index(slice(session_upload, session_upload + 1))
    params = method.adapt(method.upload(first))
    shared = {k: v[0] for k, v in params.items()}
    return method.predict(data.f_g, shared).argmax(-1).cpu()
