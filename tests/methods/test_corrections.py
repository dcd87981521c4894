"""The on-device corrections: causal, reset per session, and each doing what its paper says."""

import math

import pytest
import torch

from stablesynth.methods.corrections import (
    CORRECTIONS,
    T3A,
    EMPriorCorrection,
    OnlineLabelShift,
    TentSAR,
    choose,
    project_to_simplex,
)
from stablesynth.models.device import StaticHead

K = 5


def _head(seed: int = 0) -> StaticHead:
    torch.manual_seed(seed)
    return StaticHead(dropout=0.0).eval()


def _theta(n: int, seed: int = 1, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, 96, generator=g) * scale
    return w.expand(n, -1, -1), torch.zeros(n, K)


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_every_correction_is_causal_and_starts_afresh_each_session(name):
    c = CORRECTIONS[name](K)
    c.fit(torch.randn(40, K), torch.arange(40) % K, torch.arange(40) % K)
    static, f_g = _head(), torch.randn(12, 192)
    w, b = _theta(12)
    full = c.stream(static, f_g, w, b)
    assert full.shape == (12, K) and torch.isfinite(full).all()
    # Clip t never depends on the clips after it ...
    assert torch.allclose(c.stream(static, f_g[:5], w[:5], b[:5]), full[:5], atol=1e-5)
    # ... and a session is not changed by the one streamed before it (no state outlives a session).
    c.stream(static, torch.randn(30, 192), *_theta(30, seed=9))
    assert torch.allclose(c.stream(static, f_g, w, b), full, atol=1e-5)
    # The deployed head is left as it was (TENT adapts a copy of the LayerNorm).
    assert torch.equal(static.norm.weight, _head().norm.weight)


def test_simplex_projection():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(project_to_simplex(p), p)
    q = project_to_simplex(torch.tensor([1.5, -0.4, 0.1, 0.2]))
    assert torch.all(q >= 0) and math.isclose(float(q.sum()), 1.0, rel_tol=1e-6)
    assert float(q[1]) == 0.0


@pytest.mark.parametrize("cls", [EMPriorCorrection, OnlineLabelShift])
def test_prior_corrections_follow_a_skewed_session(cls):
    c = cls(K)
    labels = torch.arange(200) % K
    # A head that is right 80 % of the time on the validation clips.
    g = torch.Generator().manual_seed(0)
    logits = torch.nn.functional.one_hot(labels, K).float() * 2 + torch.randn(200, K, generator=g)
    c.fit(logits, labels, labels)
    c.set_hyper(prior_strength=1.0)
    static = _head()
    # A session whose head leans to class 2 on every clip: the estimate moves there.
    w, b = torch.zeros(40, K, 96), torch.zeros(40, K)
    b[:, 2] = 0.5
    probs = c.stream(static, torch.randn(40, 192), w, b).softmax(-1)[:, 2]
    assert probs[-1] > probs[0] + 0.1


def test_label_shift_estimator_is_unbiased_under_the_confusion():
    c = OnlineLabelShift(K)
    labels = torch.arange(400) % K
    # Class 0 is answered 1 half of the time: a session of true 0s shows half 0s and half 1s,
    # and the estimator C⁻¹ e_ŷ must read that mix as a session of 0s, not as half 1s.
    pred = labels.clone()
    zeros = torch.nonzero(labels == 0).flatten()
    pred[zeros[::2]] = 1
    c.fit(torch.nn.functional.one_hot(pred, K).float(), labels, labels)
    session = torch.tensor([0, 1] * 20)
    estimate = c.confusion_inv[:, session].mean(1)
    assert float(estimate[0]) > 0.9 and abs(float(estimate[1])) < 0.1


def test_t3a_moves_prototypes_to_the_session():
    torch.manual_seed(0)
    static = _head()
    # Clips of K clusters in the static head's feature space; the head's rows point elsewhere.
    centers = torch.randn(K, 192) * 3
    y = torch.arange(200) % K
    f_g = centers[y] + 0.3 * torch.randn(200, 192)
    with torch.no_grad():
        z = static(f_g)
        means = torch.stack([z[y == k].mean(0) for k in range(K)])
    w = (means + 0.8 * means.norm(dim=1, keepdim=True) * torch.nn.functional.normalize(torch.randn(K, 96), dim=1))
    w, b = w.expand(200, -1, -1), torch.zeros(200, K)
    base = (torch.einsum("nh,nkh->nk", z, w).argmax(-1) == y).float().mean()
    c = T3A(K)
    c.set_hyper(filter_k=-1.0)
    adapted = (c.stream(static, f_g, w, b)[100:].argmax(-1) == y[100:]).float().mean()
    assert adapted >= base


def test_tent_sar_skips_uncertain_clips_and_survives_a_huge_step():
    static, f_g = _head(), torch.randn(30, 192)
    c = TentSAR(K)
    # A head that knows nothing: every clip's entropy is ln K, above E0, so nothing updates.
    w, b = torch.zeros(30, K, 96), torch.zeros(30, K)
    assert torch.allclose(c.stream(static, f_g, w, b), torch.zeros(30, K))
    # A confident head and an absurd step: the collapse reset keeps the stream finite.
    c.set_hyper(lr=100.0)
    out = c.stream(static, f_g, *_theta(30, scale=3.0))
    assert torch.isfinite(out).all()
    assert c.backprop and not T3A.backprop


def test_choose_keeps_the_most_accurate_point_and_the_earlier_on_ties():
    c = EMPriorCorrection(K)
    static = _head()
    w, b = _theta(10)
    with torch.no_grad():
        label = c.stream(static, torch.randn(10, 192), w, b).argmax(-1)
    tried = choose(c, [(static, torch.randn(10, 192), w, b, label)])
    assert len(tried) == len(EMPriorCorrection.grid["prior_strength"])
    best = max(tried.values())
    first_best = next(k for k, v in tried.items() if v == best)
    assert first_best == f"prior_strength={float(c.prior_strength):g}"


def test_t3a_filter_keeps_the_lowest_entropy_supports_of_each_class():
    from stablesynth.methods.corrections import _lowest_per_class

    labels = torch.tensor([0, 1, 0, 0, 1, 2])
    ent = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.3, 0.4])
    assert sorted(_lowest_per_class(labels, ent, 2, 3).tolist()) == [0, 1, 2, 4, 5]
    assert sorted(_lowest_per_class(labels, ent, 1, 3).tolist()) == [1, 2, 5]
