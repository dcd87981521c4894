"""Stage 0: learns from clean easy-VQA, caches by its inputs, leaves the caller's RNG alone, loads by name."""

from pathlib import Path

import pytest
import torch

from stablesynth.checkpoint import load_checkpoint, read_manifest
from stablesynth.data.pretrain import build_pretrain_set
from stablesynth.models.encoder import ENCODERS, create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.stage0 import (
    PretrainModel,
    Stage0Config,
    evaluate_pretrained,
    load_stage0,
    pretrain_stage0,
    stage0_dir,
    stage0_key,
)

ENC = "allinone-test"
# A frozen word table: AdamW over 30,522 rows would dominate a tiny model's step.
OVERRIDES = {"max_text_len": 16, "freeze_word_embeddings": True}


@pytest.fixture(scope="module")
def train16():
    return build_pretrain_set("train", size=16, max_question_len=16)


def _quiet(*_):
    return None


def test_conv_stem_keeps_the_token_grid_and_existing_names():
    plain = create_model(ENC)
    stem = create_model(ENC, stem_channels=[8, 16])
    assert not any(k.startswith("patch_embed.stem") for k in plain.state_dict())
    assert "patch_embed.stem.0.weight" in stem.state_dict() and "patch_embed.stem.2.weight" in stem.state_dict()
    assert stem.pos_embed.shape == plain.pos_embed.shape
    frames = torch.randn(2, 1, 3, 16, 16)
    ids = torch.randint(1000, 2000, (2, 6))
    assert stem(frames, ids, torch.ones_like(ids)).shape == (2, 1, 192)
    assert ENCODERS.get("allinone-cpu-stem").stem_channels


def test_stage0_learns_to_see_from_a_small_subset(tmp_path: Path, train16):
    cfg = Stage0Config(epochs=3, lr=1e-3, batch_size=32, limit_questions=3072, head_dropout=0.0,
                       answer_warmup_ratio=0.5, evaluate=False)
    ckpt = pretrain_stage0(ENC, OVERRIDES, cfg, tmp_path, log=_quiet, data=train16)
    manifest = read_manifest(ckpt)
    assert manifest["kind"] == "stage0" and manifest["epoch"] == 3 and manifest["questions"] == 3072
    assert "optim" not in " ".join(manifest["tensors"])  # a finished stage 0 keeps no optimizer state
    model = PretrainModel(create_model(ENC, **OVERRIDES), len(train16.answers), 0.0)
    tensors, _ = load_checkpoint(ckpt)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
    acc = evaluate_pretrained(model, train16.subset(torch.arange(3072, 6144)))  # scenes it never saw
    # The scene's colour read off the fused feature: chance is 1/8.
    assert acc["aux_color"] > 0.5


def test_stage0_is_cached_keyed_and_leaves_the_rng_alone(tmp_path: Path, train16):
    cfg = Stage0Config(epochs=1, batch_size=16, max_steps_per_epoch=3, evaluate=False)
    logs: list[str] = []
    torch.manual_seed(123)
    ckpt = pretrain_stage0(ENC, OVERRIDES, cfg, tmp_path, log=logs.append, data=train16)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # stage 0 drew nothing from the global RNG
    assert any("epoch 1/1" in m for m in logs)
    weights = (ckpt / "model.safetensors").stat().st_mtime_ns

    logs.clear()
    again = pretrain_stage0(ENC, OVERRIDES, cfg, tmp_path, log=logs.append, data=train16)
    assert again == ckpt and (ckpt / "model.safetensors").stat().st_mtime_ns == weights
    assert logs and all("epoch" not in m for m in logs) and "reusing" in logs[0]

    other = pretrain_stage0(ENC, OVERRIDES, cfg.replace(lr=2e-3), tmp_path, log=logs.append, data=train16)
    assert other != ckpt and (other / "manifest.json").is_file()
    wider = pretrain_stage0(ENC, {**OVERRIDES, "mlp_ratio": 2.0}, cfg, tmp_path, log=_quiet, data=train16)
    assert len({ckpt, other, wider}) == 3
    key = stage0_key(ENC, OVERRIDES, cfg, train16.fingerprint)
    assert stage0_dir(tmp_path, key) == ckpt and read_manifest(ckpt)["key"] == key


def test_load_stage0_maps_the_head_by_answer_name(tmp_path: Path, train16):
    cfg = Stage0Config(epochs=1, batch_size=16, max_steps_per_epoch=2, evaluate=False)
    ckpt = pretrain_stage0(ENC, OVERRIDES, cfg, tmp_path, log=_quiet, data=train16)
    names = [*reversed(train16.answers), "unknown"]
    model = GlobalModel(create_model(ENC, **OVERRIDES), len(names), dropout=0.0)
    before = model.classifier.weight[-1].clone()
    load_stage0(model, ckpt, names)
    ref = PretrainModel(create_model(ENC, **OVERRIDES), len(train16.answers), 0.0)
    tensors, _ = load_checkpoint(ckpt)
    ref.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
    for k, v in ref.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    assert torch.equal(model.static.fc.weight, ref.static.fc.weight)
    assert torch.equal(model.classifier.weight[0], ref.classifier.weight[len(train16.answers) - 1])
    assert torch.equal(model.classifier.weight[-1], before)  # an answer stage 0 never saw
    with pytest.raises(ValueError, match="does not fit"):
        load_stage0(GlobalModel(create_model(ENC, max_text_len=16, depth=2), 3), ckpt, names[:3])
