"""Per-device optima of the last layer: the Θ_d a generator could at best output for one device.

The encoder and the static MLP stay frozen (the device's static parts); only W_d, b_d (or b_d
alone) are fitted, by AdamW from the global head, on one device's labelled history. These are
the ceiling of any Θ_d generator (the headroom study) and the content-free target that the
``optimum_weight`` loss pulls each device's generated Θ_d towards (``methods/baselines.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stablesynth.data.batch import FeatureBatch
from stablesynth.models.device import StaticHead

#: The fit's recipe: the per-device oracle's (20 epochs of AdamW at 1e-3, batches of 64).
OPTIMUM_EPOCHS = 20
OPTIMUM_LR = 1e-3
OPTIMUM_BATCH = 64
IGNORE = -100


@dataclass(frozen=True)
class LastLayer:
    """One device's last layer: ``weight`` [K, H], ``bias`` [K]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T + self.bias

    def flat(self) -> torch.Tensor:
        return torch.cat([self.weight.flatten(), self.bias])


@torch.no_grad()
def hidden_features(static: StaticHead, f_g: torch.Tensor) -> torch.Tensor:
    """h = static MLP(F_g) with dropout off: what the device's last layer reads."""
    was = static.training
    static.eval()
    h = static(f_g)
    static.train(was)
    return h


def fit_last_layer(hidden: torch.Tensor, label: torch.Tensor, start: LastLayer, *, seed: int,
                   bias_only: bool = False, class_weight: torch.Tensor | None = None,
                   epochs: int = OPTIMUM_EPOCHS, lr: float = OPTIMUM_LR, batch_size: int = OPTIMUM_BATCH,
                   ) -> LastLayer:
    """W, b (or b alone with ``bias_only``) fitted by cross-entropy on ``hidden`` from ``start``.

    ``class_weight`` [K] re-weights the classes of the loss: with p̄(a)/p_d(a) the fit sees the device's
    clips as if asked with the pooled answer frequencies, so it learns the camera, not the usage.
    """
    weight = nn.Parameter(start.weight.detach().clone(), requires_grad=not bias_only)
    bias = nn.Parameter(start.bias.detach().clone())
    params = [bias] if bias_only else [weight, bias]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    keep = label != IGNORE
    hidden, label = hidden[keep], label[keep]
    if len(label) == 0:
        return start
    for _ in range(epochs):
        order = torch.randperm(len(label), generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            loss = nn.functional.cross_entropy(hidden[idx] @ weight.T + bias, label[idx], weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return LastLayer(weight.detach().clone(), bias.detach().clone())


def answer_prior(label: torch.Tensor, K: int) -> torch.Tensor:
    """Answer frequencies with one pseudo-count each (never zero)."""
    counts = torch.bincount(label[label != IGNORE], minlength=K).double() + 1
    return (counts / counts.sum()).float()


def device_optima(static: StaticHead, data: FeatureBatch, start: LastLayer, *, seed: int,
                  bias_only: bool = False, balanced: bool = False) -> dict[int, LastLayer]:
    """:func:`fit_last_layer` on each device's clips of ``data``; ``balanced``: with p̄(a)/p_d(a) weights."""
    hidden = hidden_features(static, data.f_g)
    K = start.bias.shape[0]
    pooled = answer_prior(data.label, K)
    out = {}
    for d in sorted(data.device.unique().tolist()):
        mine = data.device == d
        weight = pooled / answer_prior(data.label[mine], K) if balanced else None
        out[int(d)] = fit_last_layer(hidden[mine], data.label[mine], start, seed=seed * 7919 + int(d),
                                     bias_only=bias_only, class_weight=weight)
    return out


#: Ceilings: full-batch AdamW at this rate, the step count chosen per device among these on a held-out
#: fifth of its own history, then refitted on all of it (the oracle's recipe stops well short of convergence).
CEILING_LR = 1e-2
CEILING_STEPS: tuple[int, ...] = (50, 150, 400)
CEILING_HELD_OUT = 0.2


def _fit_full_batch(hidden: torch.Tensor, label: torch.Tensor, start: LastLayer, steps: int, *,
                    bias_only: bool, class_weight: torch.Tensor | None) -> LastLayer:
    weight = nn.Parameter(start.weight.detach().clone(), requires_grad=not bias_only)
    bias = nn.Parameter(start.bias.detach().clone())
    opt = torch.optim.AdamW([bias] if bias_only else [weight, bias], lr=CEILING_LR)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(hidden @ weight.T + bias, label, weight=class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return LastLayer(weight.detach().clone(), bias.detach().clone())


def device_ceilings(static: StaticHead, data: FeatureBatch, start: LastLayer, *, seed: int,
                    bias_only: bool = False, balanced: bool = False) -> dict[int, LastLayer]:
    """Per device, a last layer fitted to convergence on its clips of ``data``: the step count of
    full-batch AdamW chosen on a held-out fifth of those clips (:data:`CEILING_STEPS`), then refitted
    on all of them. ``balanced`` as in :func:`device_optima`."""
    hidden = hidden_features(static, data.f_g)
    K = start.bias.shape[0]
    pooled = answer_prior(data.label, K)
    out = {}
    for d in sorted(data.device.unique().tolist()):
        mine = (data.device == d) & (data.label != IGNORE)
        h, y = hidden[mine], data.label[mine]
        weight = pooled / answer_prior(y, K) if balanced else None
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 7919 + int(d)))
        n_held = max(1, int(CEILING_HELD_OUT * len(y)))
        held, fit = order[:n_held], order[n_held:]
        best = max(CEILING_STEPS, key=lambda steps: float((_fit_full_batch(
            h[fit], y[fit], start, steps, bias_only=bias_only, class_weight=weight).logits(h[held]).argmax(-1)
            == y[held]).float().mean()))
        out[int(d)] = _fit_full_batch(h, y, start, best, bias_only=bias_only, class_weight=weight)
    return out
