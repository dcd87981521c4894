"""Each public layout end to end: ``stablesynth weights import``, the model built from the printed
encoder_overrides, one stage-1 step, and the device bundle exported (with its ONNX parity run)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from stablesynth.assets import minilm_dir
from stablesynth.cli import main
from stablesynth.cloud.export import export_device_bundle
from stablesynth.cloud.server import CloudModel
from stablesynth.data.benchmark import FRAME_MEAN, FRAME_STD
from stablesynth.data.clip_loader import make_loader
from stablesynth.methods.base import METHODS
from stablesynth.methods.config import MethodConfig
from stablesynth.models.encoder import create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.stage1 import Stage1Config, train_stage1

pytestmark = pytest.mark.slow

#: The tiny benchmark's questions are up to 16 tokens (as tests/training/test_stages.py builds the encoder).
TEXT = ["--set", "max_text_len=16"]


def _source(layout: str, tmp: Path, hf_folder: Callable[..., Path], timm_state: Callable[[], Any],
            allinone_ckpt: Callable[..., Path]) -> list[str]:
    """``--from`` and SRC of each layout's source, on disk as a user has it."""
    if layout == "timm":
        torch.save({"model": timm_state()}, tmp / "deit.pth")
        return ["timm", str(tmp / "deit.pth")]
    if layout == "hf-vit":
        return ["hf", str(hf_folder("vit"))]
    if layout == "hf-deit":  # at 32 px: its 4×4 position grid is resampled to the preset's 2×2
        return ["hf", str(hf_folder("deit", image_size=32))]
    return ["allinone", str(allinone_ckpt())]


@pytest.mark.parametrize("layout", ["timm", "hf-vit", "hf-deit", "allinone"])
def test_import_train_one_step_and_export(layout, tmp_path, hf_folder, timm_state, allinone_ckpt, tiny_bench,
                                          capsys):
    out = tmp_path / f"{layout}.safetensors"
    source = _source(layout, tmp_path, hf_folder, timm_state, allinone_ckpt)
    capsys.readouterr()
    code = main(["weights", "import", "--from", *source, "--preset", "allinone-test", *TEXT, "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    overrides = json.loads(text.out.split("encoder_overrides: ", 1)[1].strip())
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["encoder_overrides"] == overrides and overrides["max_text_len"] == 16
    if layout == "hf-deit":
        assert "embeddings.distillation_token" in manifest["dropped"]
        assert "resampled from a 4×4 grid to 2×2" in manifest["tensors"]["pos_embed"]["note"]
    if layout == "allinone":
        assert "text_embeddings.word_embeddings.weight" in manifest["tensors"]

    torch.manual_seed(0)
    encoder = create_model("allinone-test", **overrides)
    imported = load_file(str(out))
    for key, value in imported.items():
        assert torch.equal(encoder.state_dict()[key], value), key
    model = GlobalModel(encoder, tiny_bench.num_classes, dropout=0.0)
    cfg = Stage1Config(epochs=1, lr=1e-3, batch_size=8, head_dropout=0.0, max_steps_per_epoch=1)
    info = train_stage1(model, lambda e: make_loader(tiny_bench, "history", "seen", batch_size=8, shuffle=True, seed=e),
                        cfg, tmp_path / "stage1", seed=0, log=lambda *_: None)
    assert len(info["history"]) == 1 and torch.isfinite(torch.tensor(info["history"][0]["loss"]))
    assert not torch.equal(model.encoder.patch_embed.proj.weight, imported["patch_embed.proj.weight"])

    torch.manual_seed(0)
    method = METHODS.get("stablesynth")(MethodConfig(generator="film"), tiny_bench.num_classes).eval()
    cloud = CloudModel(method, "easyvqa", "7", tiny_bench.num_classes, "stablesynth",
                       MethodConfig(generator="film").to_dict())
    bc = tiny_bench.cfg
    pre = {"image_size": bc.image_size, "mean": list(FRAME_MEAN), "std": list(FRAME_STD),
           "frames_per_clip": bc.frames_per_clip, "global_frames": bc.global_frames, "global_sampling": "uniform",
           "upload_frame": "middle", "max_question_len": bc.max_question_len}
    questions = [q for split in ("train", "test") for q in tiny_bench.data.split(split).questions]
    tokenizer_json = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    bundle = export_device_bundle(cloud, model.eval(), pre, tiny_bench.answer_names, questions, tokenizer_json,
                                  tmp_path / "bundle", encoder_name="allinone-test",
                                  batches=lambda: make_loader(tiny_bench, "realtime", "all", batch_size=8))
    parity = json.loads((bundle / "manifest.json").read_text())["parity"]
    assert parity["encoder_max_abs_diff"] <= 1e-4, parity


@torch.no_grad()
def test_allinone_import_at_paper_size_computes_the_release_forward(tmp_path):
    """The paper's allinone-ti (12 blocks, 224 px, 40 tokens): the import against the release's forward."""
    from stablesynth.models.weights.equivalence import TOLERANCE, check_allinone, check_hf

    for m in check_allinone("allinone-ti", tmp_path / "a") + check_hf("vit", "allinone-ti", tmp_path / "v"):
        assert m.bound is None or m.max_abs_diff <= TOLERANCE, (m.check, m.compared, m.max_abs_diff)
