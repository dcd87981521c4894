"""Per-device last-layer optima and the optimum term of the hypernetwork loss."""

import torch

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods import build_method, default_method_config
from stablesynth.methods.device_optima import (
    LastLayer,
    answer_prior,
    device_ceilings,
    device_optima,
    fit_last_layer,
)
from stablesynth.models.device import FEATURE_DIM, HIDDEN_DIM, StaticHead

K = 4


def _batch(n: int = 96, devices: int = 3, seed: int = 0) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n, 3, FEATURE_DIM, generator=g)
    label = torch.randint(0, K, (n,), generator=g)
    # Each device's answer shifts its frames along its own direction: a per-device last layer can read it.
    device = torch.arange(n) % devices
    frames += (label.float() * (device + 1).float()).view(n, 1, 1) * 0.3
    return FeatureBatch(frames=frames, label=label, category=label.clone(), device=device,
                        upload_index=torch.zeros(n, dtype=torch.long),
                        global_index=torch.tensor([[0, 1, 2]]).expand(n, 3).contiguous())


def _start() -> LastLayer:
    return LastLayer(torch.zeros(K, HIDDEN_DIM), torch.zeros(K))


def test_fit_lowers_the_loss_and_bias_only_keeps_the_weight():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(80, HIDDEN_DIM, generator=g)
    label = (hidden[:, 0] > 0).long() + 2 * (hidden[:, 1] > 0).long()
    start = _start()
    fitted = fit_last_layer(hidden, label, start, seed=0, epochs=40, lr=1e-2)
    ce = torch.nn.functional.cross_entropy
    assert ce(fitted.logits(hidden), label) < ce(start.logits(hidden), label) - 0.3
    bias = fit_last_layer(hidden, label, start, seed=0, bias_only=True)
    assert torch.equal(bias.weight, start.weight) and not torch.equal(bias.bias, start.bias)


def test_answer_prior_is_smoothed_and_ignores_unknown_answers():
    p = answer_prior(torch.tensor([0, 0, -100, 1]), 3)
    assert torch.allclose(p, torch.tensor([3, 2, 1]) / 6.0)


def test_one_optimum_per_device_and_balanced_fit_differs():
    data = _batch()
    static = StaticHead(dropout=0.0)
    plain = device_optima(static, data, _start(), seed=0)
    balanced = device_optima(static, data, _start(), seed=0, balanced=True)
    assert sorted(plain) == [0, 1, 2]
    assert any(not torch.allclose(plain[d].bias, balanced[d].bias) for d in plain)


def test_optimum_term_is_off_by_default_and_pulls_towards_each_devices_optimum():
    data = _batch()
    off = build_method("stablesynth", K, default_method_config("stablesynth"))
    off.init_from_head(StaticHead(), torch.zeros(K, HIDDEN_DIM), torch.zeros(K))
    off.prepare(data, None)
    assert off.optimum_term(off.adapt(off.upload(data)), data.device) is None

    on = build_method("f_hyper", K, default_method_config("f_hyper", optimum_weight=2.0))
    on.init_from_head(StaticHead(), torch.zeros(K, HIDDEN_DIM), torch.zeros(K))
    on.prepare(data, None)
    ids, weight, bias, _ = on._optima
    assert ids.tolist() == [0, 1, 2]
    # At each device's optimum the term is zero; at the global head (equal clips per device) it is the weight.
    at_opt = {"weight": weight[data.device], "bias": bias[data.device]}
    assert float(on.optimum_term(at_opt, data.device)) < 1e-10
    at_head = {"weight": torch.zeros(len(data), K, HIDDEN_DIM), "bias": torch.zeros(len(data), K)}
    assert abs(float(on.optimum_term(at_head, data.device)) - 2.0) < 1e-4
    # Clips of a device without an optimum (e.g. unseen) add nothing.
    other = torch.full_like(data.device, 99)
    assert float(on.optimum_term(at_head, other)) == 0.0
    loss, logs = on.loss(data)
    assert "optimum" in logs and torch.isfinite(loss)


def test_ceilings_fit_each_device_further_than_the_oracle_recipe():
    data = _batch(n=180)
    static = StaticHead(dropout=0.0)
    from stablesynth.methods.device_optima import hidden_features

    hidden = hidden_features(static, data.f_g)
    ce = torch.nn.functional.cross_entropy
    short = device_optima(static, data, _start(), seed=0)
    full = device_ceilings(static, data, _start(), seed=0)
    assert sorted(full) == [0, 1, 2]
    for d in full:
        mine = data.device == d
        assert ce(full[d].logits(hidden[mine]), data.label[mine]) < ce(short[d].logits(hidden[mine]), data.label[mine])
    bias = device_ceilings(static, data, _start(), seed=0, bias_only=True)
    assert all(torch.equal(b.weight, _start().weight) for b in bias.values())


def test_bias_target_keeps_the_global_weight_and_pulls_the_bias():
    data = _batch()
    head_w = torch.randn(K, HIDDEN_DIM, generator=torch.Generator().manual_seed(3)) * 0.1
    cfg = default_method_config("f_hyper", optimum_weight=1.0, optimum_target="bias")
    on = build_method("f_hyper", K, cfg)
    on.init_from_head(StaticHead(), head_w, torch.zeros(K))
    on.prepare(data, None)
    _, weight, bias, _ = on._optima
    assert all(torch.equal(w, head_w) for w in weight)
    assert float(bias.abs().max()) > 1e-3
    # Θ_d at the head's W with each device's bias optimum costs nothing; any other W does.
    at_opt = {"weight": head_w.expand(len(data), K, HIDDEN_DIM), "bias": bias[data.device]}
    assert float(on.optimum_term(at_opt, data.device)) < 1e-10
    moved = {"weight": at_opt["weight"] + 0.1, "bias": at_opt["bias"]}
    assert float(on.optimum_term(moved, data.device)) > 0
