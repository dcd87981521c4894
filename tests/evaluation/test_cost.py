import pytest
import torch
from torch import nn

from stablesynth.evaluation.cost import (
    count_flops,
    count_parameters,
    kb,
    payload_bytes,
    time_call,
    transfer_ms,
)


def test_full_linear_generator_flops_match_the_paper_count():
    layer = nn.Linear(96, 97 * 1501)
    with torch.no_grad():
        flops = count_flops(layer, torch.randn(1, 96))
    assert flops == 2 * 96 * 97 * 1501
    assert flops / 1e6 == pytest.approx(27.95, abs=0.01)


def test_flops_scale_with_batch_and_pass_kwargs():
    layer = nn.Linear(8, 4)

    def call(x, *, twice=False):
        y = layer(x)
        return layer(x) + y if twice else y

    assert count_flops(call, torch.randn(3, 8)) == 3 * 2 * 8 * 4
    assert count_flops(call, torch.randn(3, 8), twice=True) == 2 * 3 * 2 * 8 * 4


def test_parameter_count_of_known_module():
    m = nn.Sequential(nn.Linear(192, 96), nn.LayerNorm(96), nn.Linear(96, 13))
    assert count_parameters(m) == 192 * 96 + 96 + 2 * 96 + 96 * 13 + 13
    m[0].requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 2 * 96 + 96 * 13 + 13


def test_shared_parameters_count_once():
    lin = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(lin, lin)) == 20


def test_payload_bytes_per_encoding():
    n = 97 * 1501
    assert payload_bytes(n, "fp32") == 4 * n
    assert payload_bytes(n, "fp16") == 2 * n
    assert payload_bytes(1501 * 96, "int8", rows=1501) == 1501 * 96 + 4 * 1501
    assert payload_bytes(10, "int8") == 14
    assert kb(payload_bytes(192, "fp32")) == 0.75
    with pytest.raises(ValueError, match="unknown encoding 'bf8'"):
        payload_bytes(10, "bf8")
    with pytest.raises(ValueError, match="numel"):
        payload_bytes(-1, "fp32")


def test_transfer_time_in_the_papers_units():
    nbytes = 568.5 * 1024
    assert round(transfer_ms(nbytes, 100), 2) == 5.55
    assert transfer_ms(nbytes, 5) == pytest.approx(111.0, abs=0.1)
    assert transfer_ms(1024 * 1024, 1) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="bandwidth"):
        transfer_ms(10, 0)


def test_time_call_reports_ordered_statistics():
    calls = []
    stats = time_call(lambda: calls.append(sum(range(1000))), repeats=20, warmup=3)
    assert len(calls) == 23
    assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    assert stats["repeats"] == 20
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)
