import math

import pytest
import torch

from stablesynth.methods.losses import driver_contrastive_loss, variance_penalty


def _hand_infonce(d: torch.Tensor, cats: list[int], T: float, margin: float = 0.0) -> list[float]:
    """Eq. 6 written out with Python loops over pairs."""
    out = []
    n = len(cats)
    for i in range(n):
        pos = neg = 0.0
        for j in range(n):
            if j == i:
                continue
            c = float(torch.nn.functional.cosine_similarity(d[i], d[j], dim=0))
            if cats[j] == cats[i]:
                pos += math.exp(math.cos(min(math.acos(c) + margin, math.pi)) / T)
            else:
                neg += math.exp(c / T)
        out.append(-math.log(pos / (pos + neg)) if pos > 0 else float("nan"))
    return out


def test_zero_margin_is_supervised_infonce_by_hand():
    d = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    cats = [0, 0, 1, 1]
    mean, per, valid = driver_contrastive_loss(d, torch.tensor(cats), margin=0.0, temperature=0.5)
    hand = _hand_infonce(d, cats, 0.5)
    torch.testing.assert_close(per, torch.tensor(hand), rtol=1e-5, atol=1e-5)
    assert valid.all()
    assert mean.item() == pytest.approx(sum(hand) / 4, rel=1e-5)
    # A hand number for anchor 0: cos to 1 is 0.8 (positive), to 2 is 0, to 3 is -0.6.
    by_hand = -math.log(math.exp(1.6) / (math.exp(1.6) + 1 + math.exp(-1.2)))
    assert per[0].item() == pytest.approx(by_hand, rel=1e-5)


def test_margin_raises_loss_and_matches_hand():
    d = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    cats = [0, 0, 1, 1]
    _, per0, _ = driver_contrastive_loss(d, torch.tensor(cats), 0.0, 0.5)
    _, per, _ = driver_contrastive_loss(d, torch.tensor(cats), 0.3, 0.5)
    torch.testing.assert_close(per, torch.tensor(_hand_infonce(d, cats, 0.5, 0.3)), rtol=1e-4, atol=1e-4)
    assert (per > per0).all()


def test_anchors_without_positive_are_excluded_and_gradient_flows():
    d = torch.randn(5, 8, requires_grad=True)
    cats = torch.tensor([0, 0, 1, 2, -100])
    mean, per, valid = driver_contrastive_loss(d, cats, 0.1, 0.1)
    assert valid.tolist() == [True, True, False, False, False]
    assert per[2:].abs().sum() == 0
    assert mean.item() == pytest.approx(per[:2].mean().item())
    mean.backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0


def test_no_positive_at_all_gives_zero_in_graph():
    d = torch.randn(3, 4, requires_grad=True)
    mean, _, valid = driver_contrastive_loss(d, torch.tensor([0, 1, 2]), 0.1, 0.1)
    assert not valid.any() and mean.item() == 0.0
    mean.backward()


def test_contrastive_bad_input():
    with pytest.raises(ValueError, match="categories"):
        driver_contrastive_loss(torch.randn(3, 4), torch.tensor([0, 1]), 0.1, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        driver_contrastive_loss(torch.full((2, 4), float("nan")), torch.tensor([0, 0]), 0.1, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        driver_contrastive_loss(torch.randn(2, 4), torch.tensor([0, 0]), 0.1, 0.0)


def test_variance_penalty_by_hand():
    losses = torch.tensor([1.0, 3.0, 2.0, 2.0, 8.0, 5.0])
    cats = torch.tensor([0, 0, 1, 1, 1, 2])  # category 2 has one sample: ignored, but counts in N
    # cat 0: var of {1,3} = 1, N_0=2; cat 1: var of {2,2,8} = 8, N_1=3; N = 6.
    expected = 2 / 6 * 1.0 + 3 / 6 * 8.0
    assert variance_penalty(losses, cats).item() == pytest.approx(expected)
    mask = torch.tensor([True, True, True, True, False, True])
    # Masking sample 4 leaves cat 1 = {2, 2} (var 0) and N = 5.
    assert variance_penalty(losses, cats, mask).item() == pytest.approx(2 / 5 * 1.0)
    assert variance_penalty(losses, torch.tensor([0, 1, 2, 3, 4, 5])).item() == 0.0


def test_variance_penalty_gradient_and_shapes():
    losses = torch.tensor([1.0, 3.0], requires_grad=True)
    variance_penalty(losses, torch.tensor([0, 0])).backward()
    torch.testing.assert_close(losses.grad, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[N\]"):
        variance_penalty(torch.zeros(3), torch.zeros(2, dtype=torch.long))
