import pytest
import torch

from stablesynth.methods.templates import TemplateBank, adain_fuse


def test_first_batch_initialises_and_convex_update_converges_to_category_mean():
    torch.manual_seed(0)
    bank = TemplateBank(3, dim=8, beta=0.95, gamma=0.05)
    means = torch.randn(3, 8) * 3
    for _ in range(300):
        cats = torch.randint(0, 2, (32,))  # category 2 never appears
        feats = means[cats] + 0.5 * torch.randn(32, 8)
        bank.update(feats, cats)
    assert bank.initialised.tolist() == [True, True, False]
    assert (bank.P[2] == 0).all()
    torch.testing.assert_close(bank.P[:2], means[:2], atol=0.08, rtol=0)


def test_convex_step_by_hand():
    bank = TemplateBank(1, dim=2, beta=0.5, gamma=1.0)
    bank.update(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    assert bank.P[0].tolist() == [0.0, 0.0]
    # H = (2, 2); per-dim var of {1, 3} = 1, mean over dims 1; N = 2 → ρ = 1/2; step (1-β)ρ = 1/4.
    bank.update(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([0, 0]))
    torch.testing.assert_close(bank.P[0], torch.tensor([0.5, 0.5]))


def test_literal_update_as_written():
    bank = TemplateBank(1, dim=2, beta=0.5, gamma=1.0, update="literal")
    bank.update(torch.tensor([[4.0, 4.0]]), torch.tensor([0]))
    bank.update(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([0, 0]))
    # β P + (1−β)(H − P)/(γ Var N) = 0.5·4 + 0.5·(2 − 4)/(1·1·2) = 1.5
    torch.testing.assert_close(bank.P[0], torch.tensor([1.5, 1.5]))


def test_update_is_buffer_only_and_checks_input():
    bank = TemplateBank(2, dim=4)
    assert not list(bank.parameters())
    assert set(bank.state_dict()) == {"P", "initialised"}
    with pytest.raises(ValueError, match="number of templates"):
        bank.update(torch.randn(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        bank.update(torch.full((1, 4), float("nan")), torch.tensor([0]))
    bank.update(torch.randn(2, 4), torch.tensor([-100, -100]))
    assert not bank.initialised.any()


def test_select_nearest_soft_and_uninitialised():
    bank = TemplateBank(3, dim=2)
    _, has = bank.select(torch.randn(2, 2))
    assert not has.any()
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    x = torch.tensor([[0.9, 0.1], [0.2, 0.8], [-1.0, -1.0]])
    chosen, has = bank.select(x)
    assert has.all()
    assert chosen.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]] or chosen[2].tolist() == [0.0, 1.0]
    # Category 2 stays at zero and must never be chosen (its cosine is undefined).
    assert not (chosen == 0).all(dim=1).any()
    soft, _ = bank.select(x[:1], mode="soft", temperature=1e-3)
    torch.testing.assert_close(soft, torch.tensor([[1.0, 0.0]]))
    wide, _ = bank.select(x[:1], mode="soft", temperature=100.0)
    torch.testing.assert_close(wide, torch.tensor([[0.5, 0.5]]), atol=1e-2, rtol=0)


def test_fusion_identity_and_statistics():
    torch.manual_seed(0)
    F = torch.randn(4, 192) * 2 + 1
    P = torch.randn(4, 192) * 0.3 - 2
    assert torch.equal(adain_fuse(F, P, 0.0), F)
    out = adain_fuse(F, P, 1.0, "feature_pattern")
    torch.testing.assert_close(out.mean(1), P.mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(1, unbiased=False), P.std(1, unbiased=False), atol=1e-3, rtol=0)
    # The feature's pattern survives: correlation with F is 1.
    assert torch.corrcoef(torch.stack([out[0], F[0]]))[0, 1] > 0.9999
    other = adain_fuse(F, P, 1.0, "template_pattern")
    torch.testing.assert_close(other.mean(1), F.mean(1), atol=1e-4, rtol=0)
    assert torch.corrcoef(torch.stack([other[0], P[0]]))[0, 1] > 0.9999
    half = adain_fuse(F, P, 0.5)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * F)
    with pytest.raises(ValueError, match="direction"):
        adain_fuse(F, P, 0.5, "sideways")
    with pytest.raises(ValueError, match="lambda_f"):
        adain_fuse(F, P, 1.5)
