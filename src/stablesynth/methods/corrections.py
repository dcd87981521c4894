"""On-device test-time adaptation: what a device can do with its own session alone, with no cloud.

Each :class:`Correction` streams one device's session in capture order at batch size 1 (the
realistic case on a device) and starts again from the deployed head at the session's start:
a device's session is its own stream, so nothing carries over from one device to the next (the
official T3A, TENT and SAR code streams a whole test set and resets only on collapse). Clip t's
answer uses what clips 0..t−1 taught; T3A also uses clip t's own unlabelled feature, as the
official code does. A correction reads Θ_d per clip (weight [n, K, H], bias [n, K]): the global
head's W, b repeated, or the Θ_d the cloud generated for each clip, so the same corrections run
after StableSynthNet (``stablesynth_then_*``).

- **EM prior** (Saerens et al., 2002): the session's answer prior by EM over the earlier clips'
  posteriors; the softmax re-weighted by π / π_train.
- **Online label shift** (Wu et al., NeurIPS 2021, follow-the-history): the running prior
  estimate from the unbiased per-clip estimator C⁻¹ e_ŷ (C the head's confusion matrix on the
  validation clips), projected onto the simplex; the softmax re-weighted by it.
- **T3A** (Iwasawa & Matsuo, NeurIPS 2021): class prototypes that start as the last layer's
  rows and take in the session's pseudo-labelled features, keeping the M lowest-entropy supports
  per class; logits = feature · normalised prototype.
- **TENT + SAR** (Wang et al., ICLR 2021; Niu et al., ICLR 2023): entropy minimisation on the
  affine parameters of the static head's LayerNorm (the device model's only normalisation),
  with SAR's safeguards: only clips with entropy under E0 = 0.4 ln K update, a sharpness-aware
  (SAM) step, and a reset to the deployed weights when the entropy's moving average collapses.

Every hyper-parameter in a correction's ``grid`` is chosen on the validation sessions (held-out
history of the seen devices, :func:`choose`), never on the real-time clips the report scores.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import ClassVar

import torch
from torch import nn

from stablesynth.models.device import StaticHead, dynamic_linear

#: EM iterations per clip: the fixed point moves little once the prior has a few clips behind it.
EM_ITERATIONS = 10
#: Prior strengths (pseudo-clips of the training prior) tried on the validation clips.
PRIOR_STRENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0)
#: SAR's entropy margin is E0 = 0.4 · ln K (Niu et al., Eq. 2).
SAR_MARGIN = 0.4
#: SAR resets to the deployed weights when the moving average of the entropy falls under this.
SAR_RESET_ENTROPY = 0.2
#: SAR's moving-average factor and SAM's neighbourhood radius (the official defaults).
SAR_EMA = 0.9
SAM_RHO = 0.05
#: SGD momentum of TENT and SAR.
TENT_MOMENTUM = 0.9


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of ``logits`` [..., K] along the last axis."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of ``v`` [K] onto the probability simplex (Wu et al. project there)."""
    u, _ = torch.sort(v, descending=True)
    css = u.cumsum(0) - 1.0
    ks = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / ks > 0).max())
    return (v - css[rho] / (rho + 1)).clamp(min=0.0)


class Correction(nn.Module):
    """One on-device correction; its measured statistics and chosen hyper-parameters are buffers."""

    name: ClassVar[str]
    label: ClassVar[str]
    #: True when the device runs a backward pass (TENT + SAR); the report's cost row says so.
    backprop: ClassVar[bool] = False
    #: Hyper-parameters and the values :func:`choose` tries on the validation sessions.
    grid: ClassVar[dict[str, tuple[float, ...]]] = {}

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("train_prior", torch.full((num_classes,), 1.0 / num_classes))
        for key, values in self.grid.items():
            self.register_buffer(key, torch.tensor(float(values[0]), dtype=torch.float64))

    def fit(self, logits: torch.Tensor, labels: torch.Tensor, train_labels: torch.Tensor) -> None:
        """Statistics before deployment: π_train from the training labels, others from the head's
        ``logits`` on labelled validation clips (the confusion matrix of online label shift)."""
        valid = train_labels >= 0
        counts = torch.bincount(train_labels[valid], minlength=self.num_classes).double() + 1.0
        self.train_prior.copy_((counts / counts.sum()).float())

    def hyper(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key in self.grid}

    def set_hyper(self, **values: float) -> None:
        for key, value in values.items():
            getattr(self, key).fill_(float(value))

    def stream(self, static: StaticHead, f_g: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        """Logits [n, K] of one session's clips in capture order (weight [n, K, H], bias [n, K])."""
        raise NotImplementedError

    def state_floats(self, n_clips: int, hidden: int) -> int:
        """Floats the device keeps for this correction after ``n_clips`` clips of a session."""
        raise NotImplementedError


class EMPriorCorrection(Correction):
    """The session's answer prior by EM (Saerens et al., 2002), from the clips before each one:

    adjusted(a | x) ∝ p(a | x) · π(a) / π_train(a)
    π(a) = (Σ_{s<t} adjusted_s(a) + λ · π_train(a)) / (t + λ)      (iterated to a fixed point)

    λ (``prior_strength``) keeps an early session from trusting a handful of clips.
    """

    name: ClassVar[str] = "em_prior"
    label: ClassVar[str] = "EM prior"
    grid: ClassVar[dict[str, tuple[float, ...]]] = {"prior_strength": PRIOR_STRENGTHS}

    @torch.no_grad()
    def stream(self, static: StaticHead, f_g: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        logp = dynamic_linear(static(f_g), weight, bias).log_softmax(-1)
        post = logp.exp()
        pi_train = self.train_prior
        lam = float(self.prior_strength)
        out = torch.empty_like(logp)
        pi = pi_train.clone()
        for t in range(len(f_g)):
            out[t] = (logp[t] + (pi / pi_train).log()).log_softmax(-1)
            seen = post[: t + 1]
            pi = pi_train.clone()
            for _ in range(EM_ITERATIONS):
                adjusted = seen * (pi / pi_train)
                adjusted = adjusted / adjusted.sum(-1, keepdim=True)
                pi = (adjusted.sum(0) + lam * pi_train) / (len(seen) + lam)
        return out

    def state_floats(self, n_clips: int, hidden: int) -> int:
        # EM re-reads every earlier posterior: the state grows with the session.
        return n_clips * self.num_classes + 2 * self.num_classes


class OnlineLabelShift(Correction):
    """Online label-shift adaptation, follow-the-history (Wu et al., NeurIPS 2021, §4):

    ŝ_s = C⁻¹ e_{ŷ_s}                              (unbiased: E[e_ŷ] = C q; C[i, j] = P(ŷ = i | y = j))
    q_t = Π_Δ((Σ_{s<t} ŝ_s + λ · π_train) / (t + λ))  (Π_Δ: projection onto the simplex)
    logits_t = log p(a | x_t) + log q_t(a) / π_train(a)

    ŷ is the deployed head's answer; C is measured on the validation clips. λ pseudo-clips of the
    training prior regularise the leader (FTRL's regulariser); λ is chosen on validation.
    """

    name: ClassVar[str] = "label_shift"
    label: ClassVar[str] = "online label shift"
    grid: ClassVar[dict[str, tuple[float, ...]]] = {"prior_strength": PRIOR_STRENGTHS}

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.register_buffer("confusion_inv", torch.eye(num_classes))

    def fit(self, logits: torch.Tensor, labels: torch.Tensor, train_labels: torch.Tensor) -> None:
        super().fit(logits, labels, train_labels)
        K = self.num_classes
        keep = labels >= 0
        pred, true = logits[keep].argmax(-1), labels[keep]
        counts = torch.zeros(K, K, dtype=torch.float64)
        counts.index_put_((pred, true), torch.ones(len(pred), dtype=torch.float64), accumulate=True)
        # Half a clip on the diagonal: a class the validation clips never show reads as answered right.
        counts += 0.5 * torch.eye(K, dtype=torch.float64)
        confusion = counts / counts.sum(0, keepdim=True)
        self.confusion_inv.copy_(torch.linalg.pinv(confusion).float())

    @torch.no_grad()
    def stream(self, static: StaticHead, f_g: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        logits = dynamic_linear(static(f_g), weight, bias)
        logp = logits.log_softmax(-1)
        estimates = self.confusion_inv[:, logits.argmax(-1)].T  # ŝ_s for every clip, [n, K]
        pi_train = self.train_prior
        lam = float(self.prior_strength)
        out = torch.empty_like(logp)
        total = torch.zeros_like(pi_train)
        for t in range(len(f_g)):
            q = project_to_simplex((total + lam * pi_train) / (t + lam)).clamp(min=1e-6)
            out[t] = (logp[t] + (q / pi_train).log()).log_softmax(-1)
            total += estimates[t]
        return out

    def state_floats(self, n_clips: int, hidden: int) -> int:
        return self.num_classes * self.num_classes + 2 * self.num_classes


def _lowest_per_class(labels: torch.Tensor, score: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Indices of the ``k`` lowest-``score`` items of each label (T3A's support filter)."""
    order = torch.argsort(score, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    grouped = labels[order]
    counts = torch.bincount(grouped, minlength=num_classes)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[grouped]
    return order[rank < k]


class T3A(Correction):
    """Test-time classifier adjustment (Iwasawa & Matsuo, NeurIPS 2021).

    Supports start as the rows of W_d (each labelled by its own argmax); every clip's feature z_t
    joins them with the head's pseudo-label and entropy; per class the ``filter_k`` lowest-entropy
    supports are kept (−1: all). Prototype c_k = normalise(Σ normalise(z) over class k's supports);
    logits_t = z_t · c_k. With a generated Θ_d the starting rows are clip t's own W_d.
    """

    name: ClassVar[str] = "t3a"
    label: ClassVar[str] = "T3A"
    #: The official grid of the support filter.
    grid: ClassVar[dict[str, tuple[float, ...]]] = {"filter_k": (1.0, 5.0, 20.0, 50.0, 100.0, -1.0)}

    @torch.no_grad()
    def stream(self, static: StaticHead, f_g: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        K = self.num_classes
        z = static(f_g)
        logits = dynamic_linear(z, weight, bias)
        labels, ent = logits.argmax(-1), softmax_entropy(logits)
        k = int(self.filter_k)
        out = torch.empty_like(logits)
        for t in range(len(f_g)):
            warm = weight[t] @ weight[t].T + bias[t]
            supports = torch.cat([weight[t], z[: t + 1]])
            sup_labels = torch.cat([warm.argmax(-1), labels[: t + 1]])
            sup_ent = torch.cat([softmax_entropy(warm), ent[: t + 1]])
            if k > 0:
                keep = _lowest_per_class(sup_labels, sup_ent, k, K)
                supports, sup_labels = supports[keep], sup_labels[keep]
            onehot = nn.functional.one_hot(sup_labels, K).to(z.dtype)
            protos = nn.functional.normalize(nn.functional.normalize(supports, dim=1).T @ onehot, dim=0)
            out[t] = z[t] @ protos
        return out

    def state_floats(self, n_clips: int, hidden: int) -> int:
        k = int(self.filter_k)
        kept = n_clips + self.num_classes if k < 0 else min(n_clips + self.num_classes, self.num_classes * k)
        return kept * (hidden + 2)  # each support: feature, label, entropy


class TentSAR(Correction):
    """TENT's entropy minimisation with SAR's safeguards, one clip at a time (Niu et al., Alg. 1).

    For each clip: the answer comes from the current parameters (before this clip's update); if the
    clip's entropy is under E0, a SAM step on the LayerNorm's affine parameters follows (gradient at
    the perturbed point, again only under E0); when the moving average of the entropy falls under
    0.2 the parameters and the optimiser return to the deployed ones. ``lr`` is SGD's step.
    """

    name: ClassVar[str] = "tent_sar"
    label: ClassVar[str] = "TENT + SAR"
    backprop: ClassVar[bool] = True
    grid: ClassVar[dict[str, tuple[float, ...]]] = {"lr": (1e-4, 1e-3, 1e-2, 1e-1)}

    def stream(self, static: StaticHead, f_g: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        margin = SAR_MARGIN * math.log(self.num_classes)
        # Copies: the inputs may be inference-mode tensors (feature caches), which autograd refuses.
        f_g, weight, bias = f_g.clone(), weight.clone(), bias.clone()
        head = copy.deepcopy(static).eval()  # eval: no dropout, the deployed forward
        head.requires_grad_(False)
        params = [head.norm.weight, head.norm.bias]
        for p in params:
            p.requires_grad_(True)
        deployed = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=float(self.lr), momentum=TENT_MOMENTUM)
        ema: float | None = None
        out = torch.empty(len(f_g), self.num_classes)
        with torch.enable_grad():
            for t in range(len(f_g)):
                x, w, b = f_g[t: t + 1], weight[t], bias[t]
                logits = dynamic_linear(head(x), w, b)
                out[t] = logits.detach()[0]
                entropy = softmax_entropy(logits)[0]
                if float(entropy.detach()) >= margin:
                    continue
                opt.zero_grad(set_to_none=True)
                entropy.backward()
                # SAM: climb to the worst point within ρ, take the gradient there, come back.
                grads = [p.grad for p in params]
                norm = torch.sqrt(sum((g * g).sum() for g in grads)) + 1e-12
                steps = [SAM_RHO * g / norm for g in grads]
                with torch.no_grad():
                    for p, e in zip(params, steps, strict=True):
                        p.add_(e)
                opt.zero_grad(set_to_none=True)
                entropy2 = softmax_entropy(dynamic_linear(head(x), w, b))[0]
                passed = float(entropy2.detach()) < margin
                if passed:
                    entropy2.backward()
                with torch.no_grad():
                    for p, e in zip(params, steps, strict=True):
                        p.sub_(e)
                if not passed:
                    continue
                opt.step()
                e2 = float(entropy2.detach())
                ema = e2 if ema is None else SAR_EMA * ema + (1 - SAR_EMA) * e2
                if ema < SAR_RESET_ENTROPY:
                    with torch.no_grad():
                        for p, d in zip(params, deployed, strict=True):
                            p.copy_(d)
                    opt = torch.optim.SGD(params, lr=float(self.lr), momentum=TENT_MOMENTUM)
                    ema = None
        return out

    def state_floats(self, n_clips: int, hidden: int) -> int:
        # The adapted affine pair, SGD's momentum and the deployed copy the reset returns to.
        return 3 * 2 * hidden


CORRECTIONS: dict[str, type[Correction]] = {
    c.name: c for c in (EMPriorCorrection, OnlineLabelShift, T3A, TentSAR)
}


def choose(correction: Correction, sessions: list[tuple[StaticHead, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]]) -> dict[str, float]:
    """Try every point of ``correction.grid`` on validation ``sessions`` (static, f_g, weight, bias, label)
    and keep the most accurate; ties keep the earlier point. Returns the accuracy of each point tried."""
    if not correction.grid:
        return {}
    keys = list(correction.grid)
    tried: dict[str, float] = {}
    best, best_acc = next(itertools.product(*(correction.grid[k] for k in keys))), -1.0
    for point in itertools.product(*(correction.grid[k] for k in keys)):
        correction.set_hyper(**dict(zip(keys, point, strict=True)))
        correct = total = 0
        for static, f_g, weight, bias, label in sessions:
            pred = correction.stream(static, f_g, weight, bias).argmax(-1)
            keep = label >= 0
            correct += int((pred[keep] == label[keep]).sum())
            total += int(keep.sum())
        acc = correct / max(total, 1)
        tried[",".join(f"{k}={v:g}" for k, v in zip(keys, point, strict=True))] = acc
        if acc > best_acc:
            best, best_acc = point, acc
    correction.set_hyper(**dict(zip(keys, best, strict=True)))
    return tried
