"""Fixtures of the weight-import tests: source checkpoints on disk, as a user would have them.

Every source is built here with random weights at the tiny ``allinone-test`` sizes
(``stablesynth.models.weights.references``); nothing is downloaded. Test files run with
``--import-mode=importlib`` and cannot import each other, so helpers are handed out as fixtures.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stablesynth.models.encoder import ENCODERS
from stablesynth.models.weights import references as ref


@pytest.fixture(scope="session")
def tiny_cfg() -> Any:
    """The ``allinone-test`` encoder config (1 block, width 192, 16 px, patch 8)."""
    return ENCODERS.get("allinone-test")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: Any) -> Callable[..., Path]:
    """``hf_folder("vit"|"deit", image_size=None)``: a random Hugging Face model's ``save_pretrained`` folder."""
    made: dict[tuple[str, int | None], Path] = {}

    def make(kind: str, image_size: int | None = None) -> Path:
        if (kind, image_size) not in made:
            folder = tmp_path_factory.mktemp(f"hf-{kind}")
            ref.hf_model(kind, tiny_cfg, seed=0, image_size=image_size).save_pretrained(str(folder))
            made[(kind, image_size)] = folder
        return made[(kind, image_size)]

    return make


@pytest.fixture(scope="session")
def timm_state(hf_folder: Callable[..., Path], tiny_cfg: Any) -> Callable[[], dict[str, torch.Tensor]]:
    """``timm_state()``: the Hugging Face ViT's weights in timm's names (a fresh copy each call)."""
    from safetensors.torch import load_file

    def make() -> dict[str, torch.Tensor]:
        return ref.timm_state_from_hf(load_file(str(hf_folder("vit") / "model.safetensors")), tiny_cfg.depth)

    return make


@pytest.fixture
def lightning_types(monkeypatch: pytest.MonkeyPatch) -> type[dict]:
    """Lightning's ``AttributeDict``, importable (pickle needs it to write one) without Lightning installed."""
    parsing = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):  # type: ignore[type-arg]
        """The class of Lightning's ``hyper_parameters``."""

    AttributeDict.__module__ = parsing.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    parsing.AttributeDict = AttributeDict  # type: ignore[attr-defined]
    for name, module in (("pytorch_lightning", types.ModuleType("pytorch_lightning")),
                         ("pytorch_lightning.utilities", types.ModuleType("pytorch_lightning.utilities")),
                         (parsing.__name__, parsing)):
        monkeypatch.setitem(sys.modules, name, module)
    return AttributeDict


@pytest.fixture
def allinone_ckpt(tmp_path: Path, tiny_cfg: Any, lightning_types: type[dict]) -> Iterator[Callable[..., Path]]:
    """``allinone_ckpt(state=None, name=..., cfg=None, optimizer=True)``: a Lightning checkpoint, release layout.

    Its ``hyper_parameters`` are an ``AttributeDict`` and it carries an ``argparse.Namespace``, as real
    checkpoints do; ``state`` defaults to ``references.allinone_state(cfg, seed=3)``, ``cfg`` to allinone-test's.
    """

    def make(state: dict[str, torch.Tensor] | None = None, name: str = "allinone.ckpt", cfg: Any = None,
             optimizer: bool = True) -> Path:
        cfg = cfg if cfg is not None else tiny_cfg
        state = state if state is not None else ref.allinone_state(cfg, seed=3)
        hparams = lightning_types(ref.allinone_hyper_parameters(cfg))
        ckpt = ref.allinone_checkpoint(state, hparams, optimizer)
        ckpt["args"] = argparse.Namespace(lr=1e-4, output_dir="result")
        path = tmp_path / name
        torch.save(ckpt, path)
        return path

    yield make
