"""``--device`` parsing and the per-device helpers (CPU here; CUDA tests are marked ``gpu``)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from stablesynth.accelerator import (
    DeviceError,
    add_device_argument,
    autocast,
    configure_backends,
    dataloader_kwargs,
    describe,
    precision_name,
    resolve_device,
    to_device,
)

HAS_CUDA = torch.cuda.is_available()


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None).type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "cuda0", "", "mps"])
def test_bad_spellings_are_one_line_errors(spec):
    if spec == "":
        assert resolve_device(spec).type in ("cpu", "cuda")  # empty means auto
        return
    with pytest.raises(DeviceError, match="--device") as info:
        resolve_device(spec)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors as one line


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clear_error(spec):
    with pytest.raises(DeviceError, match="use --device cpu or auto"):
        resolve_device(spec)


def test_add_device_argument_defaults_to_auto():
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    assert "cuda[:N]" in parser.format_help()


def test_cpu_runs_fp32_and_backends_untouched():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
              torch.get_float32_matmul_precision())
    configure_backends("cpu")
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision()) == before
    a = torch.randn(4, 4)
    with autocast("cpu"):
        out = a @ a
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ a)
    assert precision_name("cpu") == "float32"
    assert describe("cpu").startswith("cpu (")


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


@dataclasses.dataclass
class Rows:
    x: torch.Tensor
    y: list


def test_to_device_keeps_cpu_tensors_and_structure():
    t = torch.arange(3)
    batch = {"t": t, "nested": [t, (t, "s")], "pair": Pair(t, 2), "rows": Rows(t, [t])}
    moved = to_device(batch, "cpu")
    assert moved["t"] is t  # no copy on CPU
    assert isinstance(moved["nested"], list) and isinstance(moved["nested"][1], tuple)
    assert moved["nested"][1][1] == "s"
    assert isinstance(moved["pair"], Pair) and moved["pair"].b == 2 and moved["pair"].a is t
    assert isinstance(moved["rows"], Rows) and moved["rows"].x is t and moved["rows"].y[0] is t


def test_dataloader_kwargs_sized_from_the_machine(monkeypatch):
    monkeypatch.setattr("stablesynth.accelerator.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    kw = dataloader_kwargs("cpu")
    assert kw["num_workers"] == 8 and kw["pin_memory"] is False and kw["persistent_workers"] is True
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the 16 cores
    assert dataloader_kwargs("cpu")["num_workers"] == 3
    assert dataloader_kwargs("cpu", decode=False) == {"num_workers": 0, "pin_memory": False}
    assert dataloader_kwargs("cpu", workers=2)["num_workers"] == 2
    monkeypatch.setattr("stablesynth.accelerator.cpu_count", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert dataloader_kwargs("cpu")["num_workers"] == 0
    with pytest.raises(ValueError):
        dataloader_kwargs("cpu", workers=-1)


def test_adding_the_option_does_not_import_torch():
    code = ("import argparse, sys; from stablesynth.accelerator import add_device_argument; "
            "add_device_argument(argparse.ArgumentParser()); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_resolves_moves_and_autocasts_bf16():
    dev = resolve_device("cuda")
    assert dev.type == "cuda" and dev.index is not None
    assert resolve_device("auto") == dev
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    configure_backends(dev)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    batch = to_device({"x": torch.ones(2, 8).pin_memory()}, dev, non_blocking=True)
    assert batch["x"].device == dev
    with autocast(dev):
        out = batch["x"] @ batch["x"].T
    assert out.dtype == torch.bfloat16
    assert precision_name(dev) == "bfloat16"
    assert dataloader_kwargs(dev)["pin_memory"] is True
    assert "cuda:" in describe(dev)
