"""Stage 1 (resumable), the feature cache (resumable, refuses foreign caches) and the stage-2 loop."""

from pathlib import Path

import pytest
import torch

from stablesynth.checkpoint import load_checkpoint, read_manifest
from stablesynth.data.batch import FeatureBatch
from stablesynth.data.clip_loader import make_loader
from stablesynth.methods import build_method
from stablesynth.models.encoder import create_model
from stablesynth.models.global_model import GlobalModel, encode_frames
from stablesynth.training.features import FeatureCacheError, extract_features, load_features, module_fingerprint
from stablesynth.training.stage1 import (
    AttributeHeads,
    Stage1Config,
    attribute_loss,
    polynomial_decay,
    sample_global_frames,
    train_stage1,
)
from stablesynth.training.stage2 import paired_batches, predict_per_session, train_method


def _model(k: int) -> GlobalModel:
    torch.manual_seed(0)
    return GlobalModel(create_model("allinone-test", max_text_len=16), k, dropout=0.0)


def _loader(tiny_bench):
    return lambda epoch: make_loader(tiny_bench, "history", "seen", batch_size=8, shuffle=True, seed=epoch)


def test_frame_features_do_not_depend_on_position(tiny_bench):
    model = _model(tiny_bench.num_classes).eval()
    batch = next(iter(make_loader(tiny_bench, "realtime", batch_size=2)))
    frames = batch["frames"]
    feats = encode_frames(model.encoder, frames, batch["input_ids"], batch["attention_mask"])
    swapped = encode_frames(model.encoder, frames.flip(1), batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(feats.flip(1), swapped, atol=1e-5)


def test_polynomial_decay_warms_up_then_reaches_zero():
    assert polynomial_decay(0, 100, 10) == pytest.approx(0.1)
    assert polynomial_decay(10, 100, 10) == pytest.approx(1.0)
    assert polynomial_decay(100, 100, 10) == pytest.approx(0.0)


def test_a_step_may_encode_fewer_of_each_clips_global_frames():
    batch = {"global_index": torch.tensor([[0, 2, 4]] * 50), "label": torch.zeros(50, dtype=torch.long)}
    torch.manual_seed(0)
    one = sample_global_frames(batch, 1)["global_index"]
    assert one.shape == (50, 1) and set(one.flatten().tolist()) == {0, 2, 4}  # each frame gets its turn
    two = sample_global_frames(batch, 2)["global_index"]
    assert all(len(set(row)) == 2 and set(row) <= {0, 2, 4} for row in two.tolist())
    for k in (0, 3, 5):  # all of them: the batch as it was
        assert torch.equal(sample_global_frames(batch, k)["global_index"], batch["global_index"])


def test_stage1_finished_checkpoint_is_reused(tmp_path: Path, tiny_bench):
    cfg = Stage1Config(epochs=1, lr=1e-3, batch_size=8, head_dropout=0.0)
    first = _model(tiny_bench.num_classes)
    train_stage1(first, _loader(tiny_bench), cfg, tmp_path / "s1", seed=0, log=lambda *_: None)
    again = _model(tiny_bench.num_classes)
    info = train_stage1(again, _loader(tiny_bench), cfg, tmp_path / "s1", seed=0, log=lambda *_: None)
    assert info["trained_epochs"] == 0
    for (n, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_stage1_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, tiny_bench):
    cfg = Stage1Config(epochs=2, lr=1e-3, batch_size=8, head_dropout=0.0)
    ref = _model(tiny_bench.num_classes)
    train_stage1(ref, _loader(tiny_bench), cfg, tmp_path / "ref", seed=0, log=lambda *_: None)

    def crashing(epoch):
        if epoch == 1:  # the run dies as epoch 2 starts, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return _loader(tiny_bench)(epoch)

    with pytest.raises(KeyboardInterrupt):
        train_stage1(_model(tiny_bench.num_classes), crashing, cfg, tmp_path / "run", seed=0, log=lambda *_: None)
    assert read_manifest(tmp_path / "run")["epoch"] == 1
    resumed = _model(tiny_bench.num_classes)
    train_stage1(resumed, _loader(tiny_bench), cfg, tmp_path / "run", seed=0, log=lambda *_: None)
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n


def test_stage1_aux_heads_train_beside_the_answer_head_and_resume(tmp_path: Path, tiny_bench):
    cfg = Stage1Config(epochs=2, lr=1e-3, batch_size=8, head_dropout=0.0, aux_weight=1.0)
    k = tiny_bench.num_classes

    def loader(epoch):
        return make_loader(tiny_bench, "history", "seen", batch_size=8, shuffle=True, seed=epoch, attributes=True)

    ref = _model(k)
    train_stage1(ref, loader, cfg, tmp_path / "ref", seed=0, log=lambda *_: None)
    tensors, _ = load_checkpoint(tmp_path / "ref")
    assert {"aux.color.weight", "aux.shape.bias"} <= set(tensors)
    assert {n[len("model."):] for n in tensors if n.startswith("model.")} == set(ref.state_dict())
    plain = _model(k)
    train_stage1(plain, _loader(tiny_bench), cfg.replace(aux_weight=0.0), tmp_path / "plain", seed=0,
                 log=lambda *_: None)
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), plain.state_dict().values()))

    def crashing(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return loader(epoch)

    with pytest.raises(KeyboardInterrupt):
        train_stage1(_model(k), crashing, cfg, tmp_path / "run", seed=0, log=lambda *_: None)
    resumed = _model(k)
    train_stage1(resumed, loader, cfg, tmp_path / "run", seed=0, log=lambda *_: None)
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    with pytest.raises(ValueError, match="attributes=True"):
        train_stage1(_model(k), _loader(tiny_bench), cfg, tmp_path / "bare", seed=0, log=lambda *_: None)


def test_attribute_loss_leaves_unknown_attributes_out(tiny_bench):
    heads = AttributeHeads(_model(tiny_bench.num_classes), seed=0)
    batch = next(iter(make_loader(tiny_bench, "history", batch_size=4, attributes=True)))
    unknown = {**batch, "color": torch.full_like(batch["color"], -100), "shape": torch.full_like(batch["shape"], -100)}
    with torch.no_grad():
        _, with_known = attribute_loss(heads, batch, 1.0)
        _, task = attribute_loss(heads, batch, 0.0)
        _, none_known = attribute_loss(heads, unknown, 1.0)
    assert float(with_known) > float(task) and torch.isfinite(none_known) and float(none_known) == float(task)


def test_feature_cache_resumes_and_refuses_other_encoders(tmp_path: Path, tiny_bench):
    model = _model(tiny_bench.num_classes)
    rows = tiny_bench.rows("history", "all")
    key = {"encoder": module_fingerprint(model.encoder), "clips": len(rows)}

    def loader():
        return make_loader(tiny_bench, "history", "all", batch_size=8)

    n = (len(rows) + 7) // 8
    out = extract_features(model.encoder, loader, n, tmp_path / "c", key, shard_batches=2)
    full = load_features(out)
    assert full["frames"].shape == (len(rows), tiny_bench.cfg.frames_per_clip, 192)
    # Losing a shard and the completion mark: the extraction redoes only what is missing.
    (out / "shard-00001.safetensors").unlink()
    manifest = (out / "manifest.json").read_text().replace('"complete": true', '"complete": false')
    (out / "manifest.json").write_text(manifest)
    with pytest.raises(FeatureCacheError, match="incomplete"):
        load_features(out)
    extract_features(model.encoder, loader, n, out, key, shard_batches=2)
    assert torch.equal(load_features(out)["frames"], full["frames"])
    with pytest.raises(FeatureCacheError, match="other inputs"):
        extract_features(model.encoder, loader, n, out, {**key, "encoder": "something else"}, shard_batches=2)
    (out / "shard-00000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FeatureCacheError, match="corrupt"):
        load_features(out)


def _synthetic(n=96, k=4, seed=0) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(k, (n,), generator=g)
    centers = torch.randn(k, 192, generator=g)
    frames = centers[label].unsqueeze(1) + 0.3 * torch.randn(n, 5, 192, generator=g)
    return FeatureBatch(frames=frames, label=label, category=label.clone(), device=torch.arange(n) % 3,
                        upload_index=torch.zeros(n, dtype=torch.long),
                        global_index=torch.tensor([[0, 1, 2]]).repeat(n, 1))


def test_paired_batches_give_every_anchor_another_sample_of_its_category():
    cats = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    seen_partners: dict[int, set[int]] = {}
    for seed in range(20):
        for idx in paired_batches(cats, 6, torch.Generator().manual_seed(seed)):
            half = len(idx) // 2
            anchors, partners = idx[:half], idx[half:]
            assert torch.equal(cats[anchors], cats[partners])
            assert not bool((anchors == partners).any())  # never a sample paired with itself
            for a, p in zip(anchors.tolist(), partners.tolist(), strict=True):
                seen_partners.setdefault(a, set()).add(p)
    # Every other member of the category is drawn (uniform over the others), never the anchor.
    assert seen_partners[2] == {3, 4} and seen_partners[7] == {8, 9}


def test_a_sample_alone_in_its_category_brings_no_partner():
    cats = torch.tensor([0, 1, 1, 1])
    for idx in paired_batches(cats, 8, torch.Generator().manual_seed(0)):
        anchors = idx[:4]
        partners = idx[4:]
        assert len(partners) == 3 and 0 not in partners.tolist()
        assert sorted(anchors.tolist()) == [0, 1, 2, 3]


def test_stage2_is_seeded_and_learns():
    data = _synthetic()
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_method("stablesynth", 4)
        info = train_method(m, data, epochs=8, batch_size=32, lr=1e-3, weight_decay=0.0, seed=3)
        losses.append([h["ce"] for h in info["history"]])
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0]


def test_per_session_mode_uses_one_upload_for_every_clip():
    data = _synthetic(n=10)
    m = build_method("f_hyper", 4).eval()
    preds = predict_per_session(m, data)
    params = m.adapt(m.upload(data.index(slice(0, 1))))
    expected = m.predict(data.f_g, {k: v[0] for k, v in params.items()}).argmax(-1)
    assert torch.equal(preds, expected)
