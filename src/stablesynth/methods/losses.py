"""StableSynthNet's training losses: Eq. 5–6 (driver contrastive) and Eq. 7–8 (variance penalty).

Samples whose category is negative (e.g. −100, an answer outside the vocabulary)
take part in neither loss: they are no anchor, no positive and no negative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_COS_EPS = 1e-6


def driver_contrastive_loss(drivers: torch.Tensor, categories: torch.Tensor, margin: float,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Driver Contrastive Training, Eq. 5–6, on the parametric drivers d_i (DESIGN §3).

    cos θ_ij = cos(d_i, d_j), clamped to [−1+ε, 1−ε] before arccos;
    f_pos(i) = Σ_{j∈P(i)} exp(cos(min(θ_ij + m, π)) / T)  (ArcFace's additive angular margin),
    f_neg(i) = Σ_{g∈N(i)} exp(cos θ_ig / T),
    ℓ_i = −log f_pos(i) / (f_pos(i) + f_neg(i)).

    Returns (mean ℓ over valid anchors, ℓ [N] with 0 where invalid, valid mask [N]).
    An anchor is valid when it has at least one positive (another sample of its category).
    With no valid anchor the mean is a zero that still belongs to the graph.
    """
    if drivers.dim() != 2:
        raise ValueError(f"drivers must be [N, d], got {tuple(drivers.shape)}")
    if categories.shape != drivers.shape[:1]:
        raise ValueError(f"categories must be [{drivers.shape[0]}], got {tuple(categories.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= margin <= math.pi:
        raise ValueError(f"margin must be in [0, π], got {margin}")
    if not torch.isfinite(drivers).all():
        raise ValueError("drivers contain NaN or inf")
    N = drivers.shape[0]
    z = F.normalize(drivers, dim=1)
    cos = (z @ z.T).clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
    known = categories >= 0
    not_self = ~torch.eye(N, dtype=torch.bool, device=drivers.device)
    pair_ok = not_self & known.unsqueeze(0) & known.unsqueeze(1)
    same = categories.unsqueeze(0) == categories.unsqueeze(1)
    pos = pair_ok & same
    neg = pair_ok & ~same
    # With m = 0, cos(arccos(c)) = c: skip arccos's steep gradient near ±1.
    pos_cos = torch.cos(torch.clamp(torch.arccos(cos) + margin, max=math.pi)) if margin > 0 else cos
    valid = pos.any(dim=1)
    # Rows without a positive get finite dummy logits: an all −inf row would put NaN in the gradient.
    live = valid.unsqueeze(1)
    logits_pos = torch.where(pos, pos_cos / temperature, float("-inf"))
    logits_pos = torch.where(live, logits_pos, 0.0)
    logits_all = torch.where(pos | neg, torch.where(pos, pos_cos, cos) / temperature, float("-inf"))
    logits_all = torch.where(live, logits_all, 0.0)
    # ℓ_i = log(f_pos + f_neg) − log f_pos
    lse_pos = torch.logsumexp(logits_pos, dim=1)
    lse_all = torch.logsumexp(logits_all, dim=1)
    per_sample = torch.where(valid, lse_all - lse_pos, torch.zeros_like(lse_all))
    mean = per_sample[valid].mean() if bool(valid.any()) else drivers.sum() * 0.0
    return mean, per_sample, valid


def variance_penalty(per_sample_loss: torch.Tensor, categories: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Offset-Driver Separation, Eq. 7–8 (V-REx style), *without* λ_irm (the caller multiplies).

    Σ_c (N_c / N) · Var(ℓ | a = c) over categories with ≥ 2 samples, where ℓ are the
    per-sample losses given (StableSynthNet passes the Eq. 6 ℓ_i of the drivers), Var
    is the population variance (mean squared deviation) within the category, and N
    counts the samples that enter (masked-in, category ≥ 0). The paper sums over
    samples; averaging keeps the scale independent of the batch size.
    """
    if per_sample_loss.dim() != 1 or categories.shape != per_sample_loss.shape:
        raise ValueError(f"per_sample_loss and categories must both be [N], got "
                         f"{tuple(per_sample_loss.shape)} and {tuple(categories.shape)}")
    keep = categories >= 0
    if mask is not None:
        if mask.shape != keep.shape:
            raise ValueError(f"mask must be [{keep.shape[0]}], got {tuple(mask.shape)}")
        keep = keep & mask.bool()
    losses = per_sample_loss[keep]
    cats = categories[keep]
    total = per_sample_loss.sum() * 0.0
    n = losses.shape[0]
    if n == 0:
        return total
    uniq, inverse, counts = torch.unique(cats, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=losses.dtype, device=losses.device).index_add(0, inverse, losses)
    means = sums / counts
    sq = torch.zeros_like(sums).index_add(0, inverse, (losses - means[inverse]) ** 2)
    var = sq / counts
    use = counts >= 2
    return total + (counts[use].to(losses.dtype) / n * var[use]).sum()
