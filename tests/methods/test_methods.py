import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stablesynth.config import ConfigError
from stablesynth.data.batch import FeatureBatch
from stablesynth.methods import METHODS, MethodConfig, build_method, default_method_config
from stablesynth.models.device import StaticHead
from stablesynth.registry import UnknownNameError

K = 5
ON_DEVICE = ["em_prior", "label_shift", "t3a", "tent_sar"]
AFTER_STABLESYNTH = [f"stablesynth_then_{n}" for n in ON_DEVICE]
ALL = sorted(["duet", "f_hyper", "f_linear", "fine_tune", "stablesynth", "stage2_control", *ON_DEVICE,
              *AFTER_STABLESYNTH])


def _batch(n: int = 64, seed: int = 0, frames: int = 6) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(K, 192, generator=torch.Generator().manual_seed(123)) * 2
    label = torch.arange(n) % K
    x = centers[label].unsqueeze(1) + torch.randn(n, frames, 192, generator=g)
    return FeatureBatch(frames=x, label=label, category=label.clone(),
                        device=torch.zeros(n, dtype=torch.long),
                        upload_index=torch.randint(0, frames, (n,), generator=g),
                        global_index=torch.randint(0, frames, (n, 3), generator=g))


def _method(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = default_method_config(name, dropout=0.0, **overrides)
    return build_method(name, K, cfg)


def test_registry_and_defaults():
    assert METHODS.names() == ALL
    assert default_method_config("duet").generator == "full"
    assert default_method_config("stablesynth").templates
    assert not default_method_config("f_hyper").contrastive
    with pytest.raises(UnknownNameError, match="known"):
        default_method_config("nope")


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="lambda_f"):
        MethodConfig.from_dict({"lambda_f": 2.0})
    with pytest.raises(ConfigError, match="generator"):
        MethodConfig.from_dict({"generator": "huge"})
    with pytest.raises(ConfigError, match="unknown key temprature"):
        MethodConfig.from_dict({"temprature": 0.1})
    assert MethodConfig.from_dict(MethodConfig().to_dict()) == MethodConfig()


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_loss_decreases(name):
    m = _method(name, templates=True) if name == "stablesynth" else _method(name)
    batch = _batch()
    up = m.upload(batch)
    params = m.adapt(up)
    assert params["weight"].shape == (64, K, 96) and params["bias"].shape == (64, K)
    assert m.predict(batch.f_g, params).shape == (64, K)
    if m.adaptive:
        assert m.driver(up).shape == (64, 96)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3)
    first = m.loss(batch)[0].item()
    for _ in range(15):
        logs = m.update(batch, opt)
    assert isinstance(logs["ce"], float)
    assert m.loss(batch)[0].item() < first


def test_init_from_head_copies_the_stage1_head():
    static = StaticHead()
    w, b = torch.randn(K, 96), torch.randn(K)
    batch = _batch(8)
    expected = None
    for name in ALL:
        m = _method(name)
        m.init_from_head(static, w, b)
        m.eval()
        logits = m(batch)
        if expected is None:
            static.eval()
            expected = static(batch.f_g) @ w.T + b
        # Every method starts as the stage-1 head (templates are empty, generators exact at W0).
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head must be"):
        _method("f_hyper").init_from_head(static, torch.randn(K + 1, 96), b)


def test_trains_in_stage2_flags():
    # The stage-1 head as is (Fine-tuning) and corrected on the device train nothing in stage 2; the
    # combinations reuse StableSynthNet's stage 2 as it is.
    assert {n for n in ALL if not METHODS.get(n).trains_in_stage2} == {"fine_tune", *ON_DEVICE}
    assert {n for n in ALL if METHODS.get(n).stage2_of} == set(AFTER_STABLESYNTH)
    assert [n for n in ALL if METHODS.get(n).proposed] == ["stablesynth"]
    assert not METHODS.get("f_linear").adaptive and METHODS.get("duet").adaptive


def test_all_modules_off_is_f_hyper():
    off = dict(contrastive=False, variance=False, templates=False)
    s = _method("stablesynth", **off)
    f = _method("f_hyper")
    batch = _batch(16)
    s.load_state_dict(f.state_dict(), strict=False)
    s.eval(), f.eval()
    torch.testing.assert_close(s(batch), f(batch))
    assert s.loss(batch)[0].item() == pytest.approx(f.loss(batch)[0].item())


def test_stablesynth_losses_and_templates_after_step():
    m = _method("stablesynth")
    batch = _batch(20)
    _, logs = m.loss(batch)
    assert {"ce", "contrastive", "variance", "loss"} <= set(logs)
    assert logs["loss"] == pytest.approx(logs["ce"] + logs["contrastive"] + 0.1 * logs["variance"], rel=1e-5)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-3)
    m.update(batch, opt)
    assert m.templates.initialised.all()
    assert not any(p is m.templates.P for p in m.parameters())
    assert "templates.P" in m.state_dict()


def test_no_label_leak():
    m = _method("stablesynth")
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3)
    for seed in range(5):
        m.update(_batch(32, seed=seed), opt)
    m.eval()
    batch = _batch(32, seed=99)
    before = m(batch)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    permuted = FeatureBatch(frames=batch.frames, label=batch.label[perm], category=batch.category[perm],
                            device=batch.device, upload_index=batch.upload_index,
                            global_index=batch.global_index)
    assert torch.equal(m(permuted), before)
    # The fusion really changes the input, so the test above is not vacuous.
    assert not torch.equal(m.fuse(batch.uploaded), batch.uploaded)


def test_duet_upload_and_bad_input():
    m = _method("duet")
    assert m.upload(_batch(4)).shape == (4, 5, 192)
    with pytest.raises(ValueError, match="only 3"):
        m.upload(_batch(4, frames=3))
    with pytest.raises(ValueError, match="f_g"):
        m.predict(torch.randn(2, 191), m.adapt(m.upload(_batch(2))))
    with pytest.raises(NotImplementedError, match="no parametric driver"):
        _method("f_linear").driver(torch.randn(2, 192))


def _cloud_flops(m, k: int) -> int:
    up = torch.randn(1, 5, 192) if m.name == "duet" else torch.randn(1, 192)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m.generator.factors(m.driver(up))
    return counter.get_total_flops()


def test_cloud_step_flops_at_msrvtt_size():
    k = 1501
    duet = build_method("duet", k)
    assert _cloud_flops(duet, k) >= 2 * 96 * 97 * k
    # Few categories (e.g. question types): the label-free template choice costs 2·192·Q.
    for gen in ("film", "lowrank"):
        cfg = default_method_config("stablesynth", generator=gen, num_categories=4)
        s = build_method("stablesynth", k, cfg)
        s.templates.update(torch.randn(8, 192), torch.arange(4).repeat(2))
        assert _cloud_flops(s, k) <= 620_000


def test_stage2_trains_only_what_adaptation_adds_by_default():
    head = StaticHead()
    w, b = torch.randn(K, 96), torch.randn(K)
    for name in ("f_hyper", "stablesynth", "duet"):
        m = build_method(name, K)
        m.init_from_head(head, w, b)
        names = {n for n, p in m.named_parameters() if any(p is q for q in m.trainable_parameters())}
        assert names and not any(n.startswith("static.") for n in names)
        assert not names & {f"generator.{n}" for n in m.generator.base_parameter_names}
        assert any(n.startswith("projector.") for n in names)
        every = build_method(name, K, default_method_config(name, stage2_trains="all"))
        assert len(list(every.trainable_parameters())) == len(list(every.parameters()))


def test_stage2_control_generates_one_head_for_every_upload():
    m = build_method("stage2_control", K).eval()
    assert not m.adaptive
    with torch.no_grad():
        for p in m.generator.parameters():
            p.normal_()
        a = m.adapt(torch.randn(3, 192))
    assert torch.equal(a["weight"][0], a["weight"][1]) and torch.equal(a["weight"][1], a["weight"][2])


def _session(f_g: torch.Tensor) -> FeatureBatch:
    n = len(f_g)
    return FeatureBatch(frames=f_g.unsqueeze(1).repeat(1, 3, 1), label=torch.zeros(n, dtype=torch.long),
                        category=torch.zeros(n, dtype=torch.long), device=torch.zeros(n, dtype=torch.long),
                        upload_index=torch.zeros(n, dtype=torch.long),
                        global_index=torch.tensor([[0, 1, 2]]).repeat(n, 1))


def test_em_prior_is_causal_and_follows_the_session_prior():
    m = build_method("em_prior", K).eval()
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    f_g = torch.randn(6, 192)
    full = m.predict_stream(_session(f_g))
    # Clip t never depends on clips after it.
    assert torch.allclose(m.predict_stream(_session(f_g[:3])), full[:3])
    # A head that knows nothing answers by the prior: a session whose clips all lean to class 2
    # moves the estimate there, so later clips are predicted as 2 once the prior has moved.
    with torch.no_grad():
        m.bias[2] = 0.5
        m.correction.set_hyper(prior_strength=1.0)
    stream = m.predict_stream(_session(torch.zeros(20, 192))).softmax(-1)[:, 2]
    assert stream[-1] > stream[0]


def test_em_prior_chooses_its_strength_on_validation():
    m = build_method("em_prior", K)
    label = torch.tensor([0, 1, 2, 3, 4] * 8)
    train = FeatureBatch(frames=torch.randn(40, 3, 192), label=label, category=label, device=torch.zeros(40).long(),
                         upload_index=torch.zeros(40).long(), global_index=torch.tensor([[0, 1, 2]]).repeat(40, 1))
    m.prepare(train, train)
    assert torch.allclose(m.correction.train_prior, torch.full((K,), 0.2))
    from stablesynth.methods.corrections import PRIOR_STRENGTHS

    assert m.on_device()["hyper"]["prior_strength"] in PRIOR_STRENGTHS
    assert len(m.on_device()["validation_accuracy"]) == len(PRIOR_STRENGTHS)
