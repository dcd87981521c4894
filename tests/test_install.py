"""The environment the README's commands build: the pinned CPU torch, no torchvision, working transformers."""

import importlib.util
import subprocess
import sys

import torch


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.split("+")[0] == "2.13.0"
    assert not torch.version.cuda, "a CUDA build of torch was installed; install with -c constraints.txt"


def test_no_torchvision_installed():
    # PyPI's torchvision cannot load beside the CPU torch and breaks transformers' model imports.
    assert importlib.util.find_spec("torchvision") is None


def test_transformers_bert_model_imports():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    out = model(torch.tensor([[101, 2054, 102]]))
    assert out.last_hidden_state.shape == (1, 3, 32)


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "stablesynth.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("demo", "bench", "payload", "data", "serve", "device", "weights"):
        assert name in out
