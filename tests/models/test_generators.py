import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stablesynth.models.device import ParamSpec, dynamic_specs
from stablesynth.models.generators import GENERATORS, create_generator
from stablesynth.models.hypernet import MLPProjector, SequenceProjector
from stablesynth.registry import UnknownNameError

K, H, D = 7, 96, 96


def _init(k: int = K) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(k, H, generator=g), "bias": torch.randn(k, generator=g)}


def _moved(name: str, seed: int, scale: float):
    """A generator moved off its exact-W0 start, so that Θ_d depends on the driver."""
    torch.manual_seed(seed)
    gen = create_generator(name, dynamic_specs(K), D, init=_init())
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(scale * torch.randn_like(p))
    return gen


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["full", "lowrank", "film"])
def test_shapes_and_factors_expand_equals_forward(name):
    gen = _moved(name, 0, 0.01)
    d = torch.randn(3, D)
    out = gen(d)
    assert out["weight"].shape == (3, K, H) and out["bias"].shape == (3, K)
    again = gen.expand(gen.factors(d))
    torch.testing.assert_close(again["weight"], out["weight"])
    assert sum(t[0].numel() for t in gen.factors(d).values()) == gen.factor_numel


@pytest.mark.parametrize("name", ["full", "lowrank", "film"])
def test_fresh_generator_reproduces_the_head_and_still_trains(name):
    init = _init()
    gen = create_generator(name, dynamic_specs(K), D, init=init)
    d = torch.randn(4, D)
    out = gen(d)
    torch.testing.assert_close(out["weight"], init["weight"].expand(4, -1, -1))
    torch.testing.assert_close(out["bias"], init["bias"].expand(4, -1))
    # The output must depend on d after one gradient step, otherwise the modulation never learns.
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    target = torch.randn(4, K)
    h = torch.randn(4, H)
    for _ in range(2):
        opt.zero_grad()
        o = gen(d)
        loss = ((torch.einsum("bh,bkh->bk", h, o["weight"]) + o["bias"] - target) ** 2).mean()
        loss.backward()
        opt.step()
    o = gen(d)
    assert not torch.allclose(o["weight"][0], o["weight"][1])


def test_shared_is_the_cached_base():
    init = _init()
    for name in ("lowrank", "film"):
        shared = create_generator(name, dynamic_specs(K), D, init=init).shared()
        torch.testing.assert_close(shared["weight"], init["weight"])
    assert create_generator("full", dynamic_specs(K), D).shared() == {}


def test_flops_at_msrvtt_size():
    specs = dynamic_specs(1501)
    d = torch.randn(1, D)
    full = _flops(lambda: create_generator("full", specs, D).factors(d))
    assert full == 2 * 96 * 97 * 1501  # 27.95 M, what the paper charges DUET
    f_p = MLPProjector(192, 96, 96)
    x = torch.randn(1, 192)
    for name in ("lowrank", "film"):
        gen = create_generator(name, specs, D, rank=4, code_dim=16)
        assert _flops(lambda gen=gen: gen.factors(f_p(x))) <= 620_000


def test_bad_input_is_refused():
    with pytest.raises(UnknownNameError, match="known: film, full, lowrank"):
        create_generator("nope", dynamic_specs(K), D)
    gen = create_generator("film", dynamic_specs(K), D)
    with pytest.raises(ValueError, match="driver must be"):
        gen(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="shape"):
        gen.reset_base({"weight": torch.zeros(K + 1, H), "bias": torch.zeros(K)})
    with pytest.raises(ValueError, match="NaN"):
        gen.reset_base({"weight": torch.full((K, H), float("nan")), "bias": torch.zeros(K)})
    with pytest.raises(ValueError, match="weight"):
        create_generator("lowrank", [ParamSpec("w", (3, 4, 5))], D)
    assert set(GENERATORS.names()) == {"full", "lowrank", "film"}


def test_projectors():
    assert MLPProjector()(torch.randn(2, 192)).shape == (2, 96)
    seq = SequenceProjector(192, 96, 96)
    assert seq(torch.randn(2, 5, 192)).shape == (2, 96)
    assert any(n.startswith("gru.") for n, _ in seq.named_parameters())
    with pytest.raises(ValueError, match="NaN"):
        MLPProjector()(torch.full((1, 192), float("nan")))
    with pytest.raises(ValueError, match=r"\[B, T>=1, 192\]"):
        seq(torch.randn(2, 192))


@pytest.mark.parametrize("name", ["lowrank", "film"])
def test_magnitude_bound_holds_and_follows_the_base(name):
    gen = _moved(name, 1, 0.5)
    with torch.no_grad():
        for scale in (1.0, 100.0):  # the remembered max|W0| must follow an in-place change
            gen.W0.mul_(scale)
            factors = gen.factors(3.0 * torch.randn(16, D))
            theta = gen.expand(factors)
            reached = torch.stack([torch.maximum(theta["weight"][i].abs().max(), theta["bias"][i].abs().max())
                                   for i in range(16)]).double()
            bound = gen.magnitude_bound(factors)
            assert bound.shape == (16,) and bool((reached <= bound).all())
            assert bool((bound <= 10 * reached).all())  # a bound, not a wild overestimate
        factors["row_shift" if name == "film" else "c"][2, 0] = float("nan")
        assert not bool(torch.isfinite(gen.magnitude_bound(factors)[2]))
    assert create_generator("full", dynamic_specs(K), D).magnitude_bound(factors) is None
