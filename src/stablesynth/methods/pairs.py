"""Pair tasks (multiple choice, retrieval): one (clip, text) pair per row, scored by the K = 1 head.

Every row is one (clip, text) pair, encoded together (the encoder fuses frame and text), and the
head gives it one logit s. Training reads s as the two logits (0, s) of All-in-One's 2-way ITM
head, so the methods' own cross-entropy over them is binary cross-entropy per row
(−log σ(s) for a match, −log σ(−s) otherwise), in stage 1 and stage 2 alike; the device's dynamic
layer stays 96 → 1. Prediction ranks rows by s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.base import Method
from stablesynth.models.global_model import GlobalModel


def two_logits(s: torch.Tensor) -> torch.Tensor:
    """One matching score s [B, 1] as the 2-way ITM logits (0, s) [B, 2]."""
    return torch.cat([torch.zeros_like(s), s], dim=-1)


class PairModel(GlobalModel):
    """Stage 1 for pair tasks: the K = 1 logit s as ITM logits (0, s), so stage 1's CE is binary CE."""

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return two_logits(super().forward(batch))


class _PairLogits:
    """Mixed into a method: its device step returns (0, s) for the single generated logit s."""

    def predict(self, f_g: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return two_logits(super().predict(f_g, params))  # type: ignore[misc]


_PAIR_CLASSES: dict[type, type] = {}


def pair_method_class(cls: type[Method]) -> type[Method]:
    """``cls`` with :class:`_PairLogits` mixed in (same parameters, so checkpoints are ``cls``'s)."""
    if cls not in _PAIR_CLASSES:
        _PAIR_CLASSES[cls] = type(f"Pair{cls.__name__}", (_PairLogits, cls), {})
    return _PAIR_CLASSES[cls]


def pair_scores(method: Method, data: FeatureBatch, batch_size: int, mode: str) -> torch.Tensor:
    """The matching score s of every row, per sample (own upload) or per session (a device's first row)."""
    method.eval()
    with torch.inference_mode():
        scores = torch.empty(len(data), dtype=torch.float64)
        if mode == "per_sample":
            for start in range(0, len(data), batch_size):
                lg = method(data.index(slice(start, start + batch_size)))
                scores[start:start + lg.shape[0]] = (lg[:, 1] - lg[:, 0]).double()
        else:
            for d in data.device.unique().tolist():
                idx = torch.nonzero(data.device == d).flatten()
                first = data.index(idx[:1])
                shared = {k: v[0] for k, v in method.adapt(method.upload(first)).items()}
                lg = method.predict(data.index(idx).f_g, shared)
                scores[idx] = (lg[:, 1] - lg[:, 0]).double()
    return scores
