"""Where the unseen-device headroom goes: the ceilings of a Θ_d generator and what one upload carries.

For one run (stage 1 and its feature caches done), on every device's real-time clips:

* **ceilings**, each fitted on the device's own labelled history with the encoder and static MLP
  frozen (``methods/device_optima.py``): the bias alone (b_d), the whole last layer (W_d, b_d), the
  last layer fitted with the usage skew weighted out (p̄(a)/p_d(a): the camera's share), and the
  global head re-weighted by the history's answer prior (the usage's share); per-device fine-tuning
  of the static MLP too (the oracle) is the top;
* per hypernetwork method: its accuracy per sample and per session, the **driver ceiling** (the best
  Θ_d its trained generator can output for a device: the driver optimised on the device's history),
  how its generated Θ_d lines up with the per-device last-layer optimum (cosine of the mean shift
  from the global head, norm ratio), and whether Θ_d varies with the device at all (the between-device
  share of its variance over clips);
* what the upload carries: the linear device probe (``studies.diagnostics``) and a ridge regression
  from the 192 floats to the camera's colour cast, scored on seen and unseen devices.

Nothing here is chosen on the real-time clips: the candidates' validation accuracies are recorded
and the bench picks on those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from stablesynth.data.batch import FeatureBatch
from stablesynth.data.benchmark import DeviceBenchmark
from stablesynth.evaluation.metrics import accuracy, accuracy_block
from stablesynth.experiment.workspace import Workspace
from stablesynth.methods import Method
from stablesynth.methods.device_optima import LastLayer, answer_prior, device_ceilings, hidden_features
from stablesynth.training.stage2 import predict_per_sample

#: Driver ceiling: full-batch Adam steps on one device's history, from its mean driver.
DRIVER_STEPS = 150
DRIVER_LR = 0.05
#: The ridge of the cast regression (on standardised features).
CAST_RIDGE = 10.0


def _by_device(logits: torch.Tensor, batch: FeatureBatch) -> dict[int, float]:
    return {int(d): accuracy(logits[batch.device == d], batch.label[batch.device == d])
            for d in batch.device.unique().tolist()}


def _layer_accuracy(hidden: torch.Tensor, batch: FeatureBatch, layers: Mapping[int, LastLayer]) -> dict[int, float]:
    out = {}
    for d in batch.device.unique().tolist():
        mine = batch.device == d
        out[int(d)] = accuracy(layers[int(d)].logits(hidden[mine]), batch.label[mine])
    return out


def ceilings(ws: Workspace, history: FeatureBatch, realtime: FeatureBatch,
             oracle_accuracy: Mapping[str, float]) -> tuple[dict[str, Any], dict[int, LastLayer], LastLayer]:
    """Per-device accuracy of each ceiling (``accuracy_block`` each), the last-layer optima, the global head."""
    static = ws.model.static
    head = LastLayer(ws.model.classifier.weight.detach().clone(), ws.model.classifier.bias.detach().clone())
    hidden = hidden_features(static, realtime.f_g)
    last = device_ceilings(static, history, head, seed=ws.seed)
    blocks: dict[str, Any] = {
        "global": _by_device(head.logits(hidden), realtime),
        "bias": _layer_accuracy(hidden, realtime, device_ceilings(static, history, head, seed=ws.seed,
                                                                  bias_only=True)),
        "last_layer_camera": _layer_accuracy(hidden, realtime,
                                             device_ceilings(static, history, head, seed=ws.seed, balanced=True)),
        "last_layer": _layer_accuracy(hidden, realtime, last),
    }
    # The usage's share: p(a|x)·p_d(a)/p̄(a) with the history's answer frequencies.
    K = ws.K
    seen_hist = history.index(torch.nonzero(torch.isin(history.device, torch.tensor(sorted(ws.seen)))).flatten())
    pooled = answer_prior(seen_hist.label, K).log()
    logp = head.logits(hidden).log_softmax(-1)
    prior = {}
    for d in realtime.device.unique().tolist():
        mine = realtime.device == d
        shift = answer_prior(history.label[history.device == d], K).log() - pooled
        prior[int(d)] = accuracy(logp[mine] + shift, realtime.label[mine])
    blocks["prior"] = prior
    blocks["oracle"] = {int(d): float(a) for d, a in oracle_accuracy.items()}
    return {k: accuracy_block(v, ws.seen) for k, v in blocks.items()}, last, head


def driver_ceiling(method: Method, history: FeatureBatch, realtime: FeatureBatch, seen: set[int],
                   steps: int = DRIVER_STEPS, lr: float = DRIVER_LR) -> dict[str, Any]:
    """The best Θ_d the trained generator can output for each device: one driver per device, fitted by
    cross-entropy on the device's history (generator, static MLP and encoder frozen), scored on its
    real-time clips. A low ceiling says the generator's family cannot express the device's optimum."""
    method.eval()
    per_dev = {}
    for d in realtime.device.unique().tolist():
        hist = history.index(torch.nonzero(history.device == d).flatten())
        test = realtime.index(torch.nonzero(realtime.device == d).flatten())
        keep = hist.label != -100
        with torch.no_grad():
            start = method.driver(method.upload(hist)).mean(0, keepdim=True)
            h_hist = method.static(hist.f_g)[keep]
            h_test = method.static(test.f_g)
        driver = nn.Parameter(start.clone())
        opt = torch.optim.Adam([driver], lr=lr)
        for _ in range(steps):
            theta = method.generator(driver)
            logits = h_hist @ theta["weight"][0].T + theta["bias"][0]
            loss = nn.functional.cross_entropy(logits, hist.label[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            theta = method.generator(driver)
            per_dev[int(d)] = accuracy(h_test @ theta["weight"][0].T + theta["bias"][0], test.label)
    return accuracy_block(per_dev, seen)


@torch.no_grad()
def alignment(method: Method, realtime: FeatureBatch, optima: Mapping[int, LastLayer], head: LastLayer,
              seen: set[int]) -> dict[str, Any]:
    """How the generated Θ_d (one per real-time clip) relates to the per-device optima.

    ``cosine``: per device, cos(mean over its clips of Θ_d − Θ_global, Θ*_d − Θ_global); ``norm_ratio``:
    ‖mean shift‖ / ‖Θ*_d − Θ_global‖; ``between_share``: the between-device part of the variance of
    Θ_d over all clips (1: Θ_d depends on the device only; 0: on the clip only). The optima's own
    shifts are what a device-following generator would produce.
    """
    method.eval()
    theta = method.adapt(method.upload(realtime))
    flat = torch.cat([theta["weight"].flatten(1), theta["bias"]], dim=1) - head.flat()
    cos, ratio = {}, {}
    total = ((flat - flat.mean(0)) ** 2).sum()
    between = torch.zeros((), dtype=flat.dtype)
    for d in realtime.device.unique().tolist():
        mine = realtime.device == d
        mean = flat[mine].mean(0)
        target = optima[int(d)].flat() - head.flat()
        cos[int(d)] = float(nn.functional.cosine_similarity(mean, target, dim=0))
        ratio[int(d)] = float(mean.norm() / target.norm().clamp_min(1e-12))
        between += mine.sum() * ((mean - flat.mean(0)) ** 2).sum()
    return {"cosine": accuracy_block(cos, seen), "norm_ratio": accuracy_block(ratio, seen),
            "between_share": float(between / total.clamp_min(1e-30)),
            "shift_norm": float(flat.norm(dim=1).mean())}


def _cast(bench: DeviceBenchmark, device: torch.Tensor, split: str) -> np.ndarray:
    """Each clip's camera colour cast: log channel gains less their mean (3 numbers), and log gamma."""
    rows = []
    for d in device.tolist():
        p = bench.devices[int(d)].profile(split)
        g = np.log(np.asarray(p.gains, dtype=np.float64))
        rows.append([*(g - g.mean()), math.log(p.gamma)])
    return np.asarray(rows)


def cast_regression(ws: Workspace, bench: DeviceBenchmark, history: FeatureBatch, realtime: FeatureBatch,
                    ridge: float = CAST_RIDGE) -> dict[str, Any]:
    """Ridge regression from one uploaded frame feature to its camera's cast, fitted on the seen devices'
    training history, R² per target on the seen and the unseen devices' real-time uploads."""
    seen = torch.tensor(sorted(ws.seen))
    train = ws.data("history", devices="train")
    x = train.uploaded.double().numpy()
    y = _cast(bench, train.device, "history")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    y_mu = y.mean(0)
    coef = np.linalg.solve(xs.T @ xs + ridge * np.eye(xs.shape[1]), xs.T @ (y - y_mu))
    out: dict[str, Any] = {"targets": ["cast_r", "cast_g", "cast_b", "log_gamma"], "ridge": ridge,
                           "train_devices": len(ws.seen)}
    is_seen = torch.isin(realtime.device, seen)
    for group, mask in (("seen", is_seen), ("unseen", ~is_seen)):
        if not bool(mask.any()):
            continue
        part = realtime.index(torch.nonzero(mask).flatten())
        pred = ((part.uploaded.double().numpy() - mu) / sd) @ coef + y_mu
        truth = _cast(bench, part.device, "realtime")
        ss_res = ((truth - pred) ** 2).sum(0)
        ss_tot = ((truth - truth.mean(0)) ** 2).sum(0)
        r2 = 1 - ss_res / np.maximum(ss_tot, 1e-12)
        out[group] = {"r2": [float(v) for v in r2], "r2_mean": float(r2.mean())}
    return out


def validation_accuracy(method: Method, batch: FeatureBatch) -> float:
    """Per-sample accuracy on validation clips; a session-causal method streams each device's clips."""
    if not method.session_causal:
        return accuracy(predict_per_sample(method, batch), batch.label)
    devices = batch.device.unique().tolist()
    preds = torch.cat([method.predict_stream(batch.index(torch.nonzero(batch.device == d).flatten()))
                       for d in devices])
    return accuracy(preds, torch.cat([batch.label[batch.device == d] for d in devices]))


def method_scores(ws: Workspace, method: Method, history: FeatureBatch, realtime: FeatureBatch,
                  optima: Mapping[int, LastLayer], head: LastLayer,
                  simulated_validation: FeatureBatch | None = None) -> dict[str, Any]:
    """A trained method's accuracy (both modes), its validation accuracy (the seen devices' held-out
    history, and simulated devices no method trains on), and, for a hypernetwork, its driver ceiling
    and alignment."""
    modes = ws.evaluate(method, realtime)
    out: dict[str, Any] = {"label": method.label, "per_sample": modes["per_sample"],
                           "per_session": modes["per_session"]}
    validation = ws.data("history", devices="validation")
    if len(validation):
        out["validation"] = validation_accuracy(method, validation)
    if simulated_validation is not None:
        out["validation_simulated"] = validation_accuracy(method, simulated_validation)
    if method.adaptive and hasattr(method, "generator") and not method.session_causal:
        out["driver_ceiling"] = driver_ceiling(method, history, realtime, ws.seen)
        out["alignment"] = alignment(method, realtime, optima, head, ws.seen)
    return out


#: Device ids of simulated devices start here, apart from the benchmark's own.
SIMULATED_ID_BASE = 10_000


def simulated_devices(run: Any, n_devices: int, per_device: int, seed: int) -> FeatureBatch:
    """History clips of ``n_devices`` cameras the cloud simulates itself, for stage 2 only.

    A second benchmark draw (its own seed stream) with the run's capture ranges, skew and drift, all
    of its devices seen, its history taken from easy-VQA's train split like every history clip (the
    scored real-time clips come from the test split), encoded by the run's stage-1 encoder and
    cached beside the run's features. The cloud needs no device for them: they stand for the range
    of cameras it expects, as the camera-like pretraining of stage 0 does. Their ids start at
    :data:`SIMULATED_ID_BASE`, so they never share a per-device target with a real device.
    """
    from stablesynth.data.clip_loader import make_loader
    from stablesynth.training.features import cached_features, module_fingerprint, to_feature_batch

    cfg = run.cfg.benchmark.replace(seed=seed, n_devices=n_devices, n_unseen=0, history_per_device=per_device,
                                    realtime_per_device=1, validation_per_device=0)
    bench = DeviceBenchmark.build(cfg)
    ws = run.ws
    encoder = ws.model.encoder
    rows = bench.rows("history", "all")
    n_batches = math.ceil(len(rows) / run.cfg.eval_batch_size)
    key = {"encoder": module_fingerprint(encoder), "benchmark": bench.fingerprint(), "split": "history",
           "devices": "all", "clean": False, "clips": len(rows)}
    feats = cached_features(
        encoder, lambda: make_loader(bench, "history", "all", batch_size=run.cfg.eval_batch_size),
        n_batches, ws.out / "features" / f"simulated-{n_devices}x{per_device}-s{seed}", key,
        f"features simulated/{n_devices} devices", ws.log, ws.device)
    batch = to_feature_batch(feats)
    batch.device = batch.device + SIMULATED_ID_BASE
    return batch
