"""Task metrics: open-ended accuracy, per-device statistics, multiple choice, recall@K.

Every metric returns a fraction in [0, 1]; reports multiply by 100 to print the
paper's percentages.

Open-ended accuracy follows All-in-One's convention by default: a question whose
answer is outside the answer vocabulary has label ``ignore_index`` (−100) and is
dropped from the denominator, so the accuracy is over answerable questions only.
``count_ignored_as_wrong=True`` keeps those questions and scores them as wrong,
the stricter convention; a report must say which one it uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

ArrayLike = torch.Tensor | Sequence[Any]
RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _tensor(x: ArrayLike, name: str) -> torch.Tensor:
    try:
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name}: cannot be read as a tensor ({exc})") from None


def predictions(logits_or_pred: ArrayLike, labels: ArrayLike) -> torch.Tensor:
    """Class predictions: argmax over the last axis of logits, or the integer predictions themselves."""
    pred = _tensor(logits_or_pred, "logits_or_pred")
    lab = _tensor(labels, "labels")
    if pred.dim() == lab.dim() + 1:
        pred = pred.argmax(dim=-1)
    if pred.shape != lab.shape:
        raise ValueError(f"predictions have shape {tuple(pred.shape)} but labels have {tuple(lab.shape)}")
    if pred.is_floating_point():
        raise ValueError("predictions must be integers (or pass logits with one more axis than labels)")
    return pred


def accuracy(logits_or_pred: ArrayLike, labels: ArrayLike, ignore_index: int = -100,
             count_ignored_as_wrong: bool = False) -> float:
    """Fraction of correct answers.

    logits_or_pred: logits [N, K] (argmax taken) or predicted indices [N].
    labels: [N]; ``ignore_index`` marks answers outside the vocabulary. By default they
    leave the denominator (All-in-One's convention); with ``count_ignored_as_wrong`` they
    stay in it and count as wrong. Returns NaN when no sample is counted.
    """
    lab = _tensor(labels, "labels").long()
    pred = predictions(logits_or_pred, lab)
    valid = lab != ignore_index
    correct = int(((pred == lab) & valid).sum())
    total = lab.numel() if count_ignored_as_wrong else int(valid.sum())
    return correct / total if total else math.nan


def _group_stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0, "mean": math.nan, "worst": math.nan, "best": math.nan, "std": math.nan}
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "n": len(values),
        "mean": float(t.mean()),
        "worst": float(t.min()),
        "best": float(t.max()),
        # Population std: the devices evaluated are the whole population being described.
        "std": float(t.std(unbiased=False)),
    }


def per_device_summary(acc_by_device: Mapping[int, float], seen: set[int] | frozenset[int]) -> dict[str, Any]:
    """Mean, worst, best and (population) standard deviation of per-device accuracy.

    Returned as ``{"all": stats, "seen": stats, "unseen": stats}`` where a device is
    "seen" when its id is in ``seen`` (it had history samples in training). Devices
    with a NaN accuracy (no answerable question) are left out and counted in
    ``"skipped"``; ids in ``seen`` without an entry are simply absent. Empty groups
    report ``n = 0`` and NaN statistics.
    """
    kept = {int(d): float(a) for d, a in acc_by_device.items() if not math.isnan(float(a))}
    out: dict[str, Any] = {
        "all": _group_stats(list(kept.values())),
        "seen": _group_stats([a for d, a in kept.items() if d in seen]),
        "unseen": _group_stats([a for d, a in kept.items() if d not in seen]),
        "skipped": len(acc_by_device) - len(kept),
    }
    return out


def accuracy_block(acc_by_device: Mapping[int, float], seen: set[int] | frozenset[int]) -> dict[str, Any]:
    """The results.json form of per-device accuracy: every device, then mean/worst/std/n per group."""
    summary = per_device_summary(acc_by_device, seen)
    return {"per_device": {str(k): v for k, v in sorted(acc_by_device.items())},
            **{g: {k: summary[g][k] for k in ("mean", "worst", "std", "n")} for g in ("seen", "unseen", "all")}}


def accuracy_by_device(logits_or_pred: ArrayLike, labels: ArrayLike, device: ArrayLike,
                       ignore_index: int = -100, count_ignored_as_wrong: bool = False) -> dict[int, float]:
    """Per-device accuracy (same convention as :func:`accuracy`), keyed by device id."""
    lab = _tensor(labels, "labels").long()
    pred = predictions(logits_or_pred, lab)
    dev = _tensor(device, "device").long()
    if dev.shape != lab.shape:
        raise ValueError(f"device has shape {tuple(dev.shape)} but labels have {tuple(lab.shape)}")
    return {
        int(d): accuracy(pred[dev == d], lab[dev == d], ignore_index, count_ignored_as_wrong)
        for d in torch.unique(dev).tolist()
    }


def recall_at_k(similarity: ArrayLike, k: int) -> float:
    """Recall@K of a query × candidate similarity matrix whose ground truth is the diagonal.

    Row i's correct candidate is column i (so N_queries <= N_candidates). A query counts
    as a hit when fewer than ``k`` other candidates score at least as high as the correct
    one: ties are ranked against the query, so a constant matrix scores 1/N, not 1.
    """
    sim = _tensor(similarity, "similarity")
    if sim.dim() != 2:
        raise ValueError(f"similarity must be a 2-d matrix, got shape {tuple(sim.shape)}")
    nq, nc = sim.shape
    if nq == 0 or nq > nc:
        raise ValueError(f"similarity must have 1 <= rows <= columns (diagonal ground truth), got {nq}×{nc}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sim = sim.double()
    rows = torch.arange(nq)
    target = sim[rows, rows].unsqueeze(1)
    rank = (sim >= target).sum(dim=1) - 1  # others at least as good as the truth
    return float((rank < k).double().mean())


def retrieval_metrics(sim_text_video: ArrayLike, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """TR@K (text → video: rank videos per caption) and VR@K (video → text) from one [N_t, N_v] matrix.

    Caption i belongs to video i (MSRVTT 1k-A has one caption per test video).
    """
    sim = _tensor(sim_text_video, "sim_text_video")
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim_text_video must be square (caption i ↔ video i), got {tuple(sim.shape)}")
    out = {f"TR@{k}": recall_at_k(sim, k) for k in ks}
    out.update({f"VR@{k}": recall_at_k(sim.T, k) for k in ks})
    return out


def mc_accuracy(logits: ArrayLike, answer_index: ArrayLike) -> float:
    """Multiple-choice accuracy: the candidate with the highest logit wins. logits [N, C], answers [N]."""
    lg = _tensor(logits, "logits")
    if lg.dim() != 2:
        raise ValueError(f"logits must be [N, num_candidates], got shape {tuple(lg.shape)}")
    ans = _tensor(answer_index, "answer_index").long()
    if ans.dim() != 1 or ans.shape[0] != lg.shape[0]:
        raise ValueError(f"answer_index must be [{lg.shape[0]}], got shape {tuple(ans.shape)}")
    if ans.numel() and (int(ans.min()) < 0 or int(ans.max()) >= lg.shape[1]):
        raise ValueError(f"answer_index must be in [0, {lg.shape[1]}), got range "
                         f"[{int(ans.min())}, {int(ans.max())}]")
    return accuracy(lg, ans)


def rows_to_candidates(scores: ArrayLike, group: ArrayLike, candidate: ArrayLike,
                       num_candidates: int) -> torch.Tensor:
    """Gather per-row scores of (question, candidate) rows into [G, num_candidates] by ``group``.

    The multiple-choice dataset yields one row per candidate with a ``group`` (question) and a
    ``candidate`` index; groups are numbered 0..G-1. A missing or doubled cell is an error.
    """
    s = _tensor(scores, "scores").reshape(-1)
    g = _tensor(group, "group").long().reshape(-1)
    c = _tensor(candidate, "candidate").long().reshape(-1)
    if not (s.shape == g.shape == c.shape):
        raise ValueError("scores, group and candidate must have the same length")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= num_candidates):
        raise ValueError(f"candidate index outside [0, {num_candidates})")
    n_groups = int(g.max()) + 1 if g.numel() else 0
    out = torch.full((n_groups, num_candidates), math.nan, dtype=torch.float64)
    flat = g * num_candidates + c
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("a (group, candidate) pair occurs twice")
    out.view(-1)[flat] = s.double()
    if torch.isnan(out).any():
        raise ValueError("some (group, candidate) pairs have no score")
    return out
