"""Serving a method that lives on a GPU: the same replies as on the CPU, over real HTTP (marked ``gpu``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from stablesynth.cloud.server import CloudModel, create_app
from stablesynth.methods.config import MethodConfig
from stablesynth_device.client import AdaptClient
from stablesynth_device.wire import protocol

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

K = 13
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def clouds(method_factory: Any) -> tuple[CloudModel, CloudModel]:
    """The same method (same seed) served on the CPU and on the GPU."""
    cfg = MethodConfig(generator="film").to_dict()
    on_cpu = CloudModel(method_factory(), "easyvqa", "7", K, "stablesynth", cfg)
    on_gpu = CloudModel(method_factory().to("cuda"), "easyvqa", "7", K, "stablesynth", cfg)
    assert on_gpu.device.type == "cuda"
    return on_cpu, on_gpu


@pytest.fixture(scope="module")
def fp32_matmuls() -> Iterator[None]:
    # Other tests in the process may have turned TF32 on (training does); serving compares in fp32.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def gpu_server(clouds: tuple[CloudModel, CloudModel], live_server: Any, fp32_matmuls: None) -> Iterator[Any]:
    with live_server(create_app({"easyvqa": clouds[1]}, token=TOKEN, max_wait_ms=5.0)) as s:
        yield s


@pytest.fixture(scope="module")
def bundle(clouds: tuple[CloudModel, CloudModel], export_test_bundle: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The device bundle, exported once from the CPU copy (the same weights as the GPU's)."""
    return export_test_bundle(clouds[0], tmp_path_factory.mktemp("dev") / "bundle")


@pytest.mark.parametrize("encoding", protocol.ENCODINGS)
def test_gpu_replies_equal_cpu_replies(gpu_server: Any, clouds: tuple[CloudModel, CloudModel], bundle: Path,
                                       tmp_path: Path, encoding: str) -> None:
    on_cpu, _ = clouds
    feature = torch.randn(192, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = {k: v[0].numpy() for k, v in on_cpu.method.adapt(feature[None]).items()}
    with AdaptClient(gpu_server.url, bundle, encoding=encoding, token=TOKEN, timeout=10,
                     cache_dir=tmp_path) as client:
        res = client.adapt(feature.numpy())
    assert res.source == "server" and res.error is None, res.error
    assert set(res.params) == set(ref)
    for name, want in ref.items():
        got = res.params[name]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
        # fp32 on both sides, summed in another order: float noise. A lossy encoding adds its bound twice,
        # since that noise may carry a value across a rounding boundary (one step, not half of one).
        bound = 1e-5 * (1 + np.abs(want)) + 2 * protocol.max_error(encoding, want)
        err = np.abs(got - want)
        assert bool((err <= bound).all()), (name, float(err.max()))


def test_concurrent_gpu_requests_are_batched_and_each_answered(gpu_server: Any,
                                                               clouds: tuple[CloudModel, CloudModel]) -> None:
    on_cpu, _ = clouds
    features = torch.randn(32, 192, generator=torch.Generator().manual_seed(3))
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": f"{protocol.MEDIA_TYPE}; encoding=fp32"}

    async def ask(client: httpx.AsyncClient, row: torch.Tensor) -> bytes:
        r = await client.post(f"{gpu_server.url}/v1/models/easyvqa/adapt", json={"feature": row.tolist()},
                              headers=headers)
        assert r.status_code == 200, r.text
        return r.content

    async def all_of_them() -> list[bytes]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(*(ask(client, row) for row in features))

    replies = asyncio.run(all_of_them())
    with torch.inference_mode():
        ref = on_cpu.method.adapt(features)
    for i, body in enumerate(replies):
        tensors, _ = protocol.decode(body, "easyvqa", "7")
        for name, want in ref.items():
            assert torch.allclose(torch.from_numpy(tensors[name]), want[i], atol=1e-5, rtol=1e-5), (i, name)
