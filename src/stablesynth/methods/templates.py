"""Template-Driver Extraction: Eq. 9–10 template updates, label-free choice, Eq. 11–12 AdaIN fusion.

Templates live in the uploaded-feature space (one row per category) as buffers:
saved with the model, never trained by gradient, updated under ``no_grad`` after
each optimizer step from the batch's uploaded features and categories. Choosing
a template never looks at a label (the same rule in training and inference), so
the label cannot leak into the generated parameters.

Choosing among Q templates by cosine similarity costs 2·dim·Q FLOPs per upload (576 k at
Q = 1501), more than the rest of the cloud step. Since argmax_c cos(F, P_c) = argmax_c
F·P̂_c (P̂_c = P_c/|P_c|; |F| is common to all c), the comparison can run in any subspace
that holds the P̂_c: with Vᵣ the top-r right singular vectors of [P̂_c] (r = SELECT_RANK),
cos(F, P_c) ≈ (F·Vᵣ)·(P̂_c·Vᵣ)/|F|, costing 2·dim·r + 2·r·Q FLOPs (433 k at Q = 1501).
It is exact whenever the templates span at most r dimensions, in particular whenever
Q ≤ r (every benchmark preset), and the top-r subspace keeps most of the templates'
energy otherwise. Vᵣ and the projected templates depend on the templates only; they are
computed once per template change (after an update or a load), not per upload.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from stablesynth.models.device import FEATURE_DIM

_STD_EPS = 1e-5
_LITERAL_EPS = 1e-8
#: Dimensions in which templates are compared when there are more templates than this.
SELECT_RANK = 128


def _outside_counters() -> contextlib.AbstractContextManager[Any]:
    """Per-template-change work runs outside FLOP counters: it is not part of a request's step."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover (older PyTorch)
        return contextlib.nullcontext()
    return _disable_current_modes()


def _check_features(x: torch.Tensor, dim: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must be [B, {dim}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")


def _version_of(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class TemplateBank(nn.Module):
    """Templates P [Q, dim] with an ``initialised`` flag per row (Eq. 9–10)."""

    P: torch.Tensor
    initialised: torch.Tensor

    def __init__(self, num_categories: int, dim: int = FEATURE_DIM, beta: float = 0.9, gamma: float = 1.0,
                 update: Literal["convex", "literal"] = "convex") -> None:
        super().__init__()
        if num_categories < 1 or dim < 1:
            raise ValueError(f"num_categories and dim must be >= 1, got {num_categories}, {dim}")
        if not 0.0 <= beta < 1.0 or gamma <= 0:
            raise ValueError(f"need 0 <= beta < 1 and gamma > 0, got beta={beta}, gamma={gamma}")
        if update not in ("convex", "literal"):
            raise ValueError(f"unknown template update {update!r} (known: convex, literal)")
        self.num_categories, self.dim = num_categories, dim
        self.beta, self.gamma, self.mode = beta, gamma, update
        self.register_buffer("P", torch.zeros(num_categories, dim))
        self.register_buffer("initialised", torch.zeros(num_categories, dtype=torch.bool))
        self._selection: tuple[Any, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None
        self._generation = 0  # bumped on every update and load, for tensors without a version counter

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._generation += 1

    def _selection_tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(initialised templates P, basis Vᵣ [dim, r] or None, compared templates [Q, r or dim]);
        cached until the templates change."""
        key = (self.P.data_ptr(), _version_of(self.P), _version_of(self.initialised), self._generation, dtype,
               self.P.device, torch.is_inference_mode_enabled())
        if self._selection is None or self._selection[0] != key:
            with _outside_counters(), torch.no_grad():
                P = self.P[self.initialised].to(dtype)
                unit = F.normalize(P, dim=1)
                basis = None
                if unit.shape[0] > SELECT_RANK:
                    basis = torch.linalg.svd(unit.double(), full_matrices=False)[2][:SELECT_RANK].T.to(dtype)
                    unit = unit @ basis
            self._selection = (key, (P, basis, unit.contiguous()))
        return self._selection[1]
    @torch.no_grad()
    def update(self, features: torch.Tensor, categories: torch.Tensor) -> None:
        """Eq. 9–10, per category c in the batch (categories < 0 are skipped).

        H_c = mean of F_i with a_i = c; Var_c = per-dimension population variance of
        those F_i averaged over the dims; N_c their count.
        ``convex`` (default): P_c ← P_c + (1−β)·ρ_c·(H_c − P_c), ρ_c = clip(1/(γ·Var_c·N_c), 0, 1).
        ``literal`` (the paper as written): P_c ← β·P_c + (1−β)·(H_c − P_c)/(γ·Var_c·N_c).
        A category seen for the first time starts at P_c = H_c (both modes).
        """
        _check_features(features, self.dim, "template features")
        if categories.shape != features.shape[:1]:
            raise ValueError(f"categories must be [{features.shape[0]}], got {tuple(categories.shape)}")
        keep = categories >= 0
        if (categories[keep] >= self.num_categories).any():
            raise ValueError(f"category id {int(categories.max())} >= number of templates "
                             f"{self.num_categories}")
        feats, cats = features[keep].to(self.P.dtype), categories[keep]
        if cats.numel() == 0:
            return
        uniq, inverse, counts = torch.unique(cats, return_inverse=True, return_counts=True)
        n = counts.to(feats.dtype).unsqueeze(1)
        H = feats.new_zeros(len(uniq), self.dim).index_add(0, inverse, feats) / n
        sq = torch.zeros_like(H).index_add(0, inverse, (feats - H[inverse]) ** 2)
        var = (sq / n).mean(dim=1)
        denom = self.gamma * var * counts.to(feats.dtype)
        old = self.P[uniq]
        if self.mode == "convex":
            rho = torch.where(denom > 0, 1.0 / denom, torch.ones_like(denom)).clamp(0.0, 1.0)
            new = old + (1.0 - self.beta) * rho.unsqueeze(1) * (H - old)
        else:
            new = self.beta * old + (1.0 - self.beta) * (H - old) / (denom.unsqueeze(1) + _LITERAL_EPS)
        self._generation += 1
        fresh = ~self.initialised[uniq]
        self.P[uniq] = torch.where(fresh.unsqueeze(1), H, new)
        self.initialised[uniq] = True

    def select(self, features: torch.Tensor, mode: Literal["nearest", "soft"] = "nearest",
               temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a template per feature WITHOUT labels: (templates [B, dim], has_template [B]).

        ``nearest``: P_c with c = argmax cos(F, P_c); ``soft``: Σ_c softmax(cos/τ)_c P_c.
        With more than SELECT_RANK templates, cos is taken in their top-SELECT_RANK subspace
        (see the module docstring).
        Uninitialised templates are never chosen; with none initialised, has_template is False.
        """
        _check_features(features, self.dim, "features")
        if mode not in ("nearest", "soft"):
            raise ValueError(f"unknown template selection {mode!r} (known: nearest, soft)")
        B = features.shape[0]
        if not bool(self.initialised.any()):
            return features.new_zeros(B, self.dim), torch.zeros(B, dtype=torch.bool, device=features.device)
        P, basis, compared = self._selection_tensors(features.dtype)
        norm = features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = ((features if basis is None else features @ basis) @ compared.T) / norm
        if mode == "nearest":
            chosen = P[sim.argmax(dim=1)]
        else:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {temperature}")
            chosen = torch.softmax(sim / temperature, dim=1) @ P
        return chosen, torch.ones(B, dtype=torch.bool, device=features.device)


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(dim=-1, keepdim=True)
    return mu, torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + _STD_EPS)


def adain_fuse(features: torch.Tensor, templates: torch.Tensor, lambda_f: float,
               direction: Literal["feature_pattern", "template_pattern"] = "feature_pattern") -> torch.Tensor:
    """Template fusion, Eq. 11–12: F' = λ_f·Υ + (1 − λ_f)·F, μ/σ over the dims of one vector (ε in σ).

    ``feature_pattern`` (AdaIN's meaning): Υ = σ(P)·(F − μ(F))/σ(F) + μ(P).
    ``template_pattern`` (the paper's prose): Υ = σ(F)·(P − μ(P))/σ(P) + μ(F).
    """
    if features.shape != templates.shape or features.dim() != 2:
        raise ValueError(f"features and templates must both be [B, D], got "
                         f"{tuple(features.shape)} and {tuple(templates.shape)}")
    if not 0.0 <= lambda_f <= 1.0:
        raise ValueError(f"lambda_f must be in [0, 1], got {lambda_f}")
    mu_f, sd_f = _mean_std(features)
    mu_p, sd_p = _mean_std(templates)
    if direction == "feature_pattern":
        upsilon = sd_p * (features - mu_f) / sd_f + mu_p
    elif direction == "template_pattern":
        upsilon = sd_f * (templates - mu_p) / sd_p + mu_f
    else:
        raise ValueError(f"unknown fusion direction {direction!r} (known: feature_pattern, template_pattern)")
    return lambda_f * upsilon + (1.0 - lambda_f) * features
