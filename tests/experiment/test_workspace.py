"""A run's methods start from the same weights whatever the process did before building them."""

from __future__ import annotations

from pathlib import Path

import torch

from stablesynth.checkpoint import save_checkpoint
from stablesynth.experiment.workspace import Workspace, drop_stale_checkpoint
from stablesynth.methods import MethodConfig
from stablesynth.models.encoder import create_model
from stablesynth.models.global_model import GlobalModel
from stablesynth.training.stage1 import Stage1Config


def _workspace(tmp_path: Path, seed: int = 0) -> Workspace:
    model = GlobalModel(create_model("allinone-test"), 5)
    return Workspace(out=tmp_path, seed=seed, K=5, seen={0}, model=model, initial=model,
                     method_config=lambda name: MethodConfig(generator="lowrank"), num_categories=lambda kind: 5,
                     answer_names=[str(i) for i in range(5)], paper_preset="msrvtt-qa", log=lambda *_: None)


def _state(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.state_dict().items()}


def test_a_methods_initial_weights_depend_on_the_run_seed_and_its_name_only(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    torch.manual_seed(1)
    first = _state(ws.method("f_hyper"))
    torch.manual_seed(2)
    torch.randn(1000)  # earlier stages drew from the global RNG (or were loaded and did not)
    again = _state(ws.method("f_hyper"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = _workspace(tmp_path, seed=1).method("f_hyper")
    assert any(not torch.equal(first[k], v) for k, v in other.state_dict().items())
    # Building a method leaves the caller's RNG where it was.
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    ws.method("duet")
    assert torch.equal(torch.rand(4), expected)


def test_a_stage1_checkpoint_from_before_an_option_existed_is_kept_at_its_default(tmp_path: Path):
    before = {k: v for k, v in Stage1Config().to_dict().items() if k != "aux_weight"}  # as older runs stored it
    for name, wanted, kept in (("same", Stage1Config(), True), ("changed", Stage1Config(aux_weight=1.0), False),
                               ("other", Stage1Config(epochs=3), False)):
        ckpt = save_checkpoint(tmp_path / name, {"w": torch.zeros(1)}, {"kind": "stage1", "config": before})
        drop_stale_checkpoint(ckpt, {"config": wanted.to_dict()}, lambda *_: None, Stage1Config)
        assert (ckpt / "manifest.json").exists() == kept, name
    ckpt = save_checkpoint(tmp_path / "strict", {"w": torch.zeros(1)}, {"kind": "stage1", "config": before})
    drop_stale_checkpoint(ckpt, {"config": Stage1Config().to_dict()}, lambda *_: None)  # no type: compared as is
    assert not ckpt.exists()


def test_a_method_checkpoint_from_before_an_option_existed_is_reused_at_its_default() -> None:
    from stablesynth.experiment.workspace import _same_config

    cfg = MethodConfig()
    old = cfg.to_dict()
    del old["optimum_weight"]  # written before the option existed
    assert _same_config(old, cfg)
    assert not _same_config({**old, "lr": cfg.lr * 2}, cfg)
    assert not _same_config({**old, "optimum_weight": 1.0}, cfg)
    assert not _same_config({"lr": "fast"}, cfg) and not _same_config(None, cfg)
