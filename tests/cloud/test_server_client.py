"""The cloud service and the device client over real HTTP on loopback, faults included."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from stablesynth.cloud import framing
from stablesynth.cloud.server import CloudModel, create_app, load_cloud_model, save_cloud_model
from stablesynth_device.bundle import Bundle
from stablesynth_device.client import AdaptClient, AdaptResult
from stablesynth_device.runtime import DeviceRuntime
from stablesynth_device.wire import protocol, uploads

K = 13  # the conftest's methods
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(cloud: CloudModel, live_server: Any) -> Iterator[Any]:
    with live_server(create_app({"easyvqa": cloud}, token=TOKEN, max_wait_ms=5.0)) as s:
        yield s


@pytest.fixture(scope="module")
def bundle(cloud: CloudModel, tmp_path_factory: pytest.TempPathFactory, export_test_bundle: Any) -> Path:
    return export_test_bundle(cloud, tmp_path_factory.mktemp("dev") / "bundle")


def _predict(client: AdaptClient, f_g: torch.Tensor, feature: torch.Tensor) -> tuple[np.ndarray, AdaptResult]:
    """What the device does with one clip: adapt from the uploaded frame, then run the ONNX head on F_g."""
    res = client.adapt(feature.numpy())
    runtime = DeviceRuntime(client.bundle)
    return runtime.predict(f_g.numpy(), res.params["weight"], res.params["bias"]), res


def _feature(seed: int) -> torch.Tensor:
    return torch.randn(192, generator=torch.Generator().manual_seed(seed))


def _in_process(cloud: CloudModel, feature: torch.Tensor, f_g: torch.Tensor) -> tuple[dict, torch.Tensor]:
    with torch.inference_mode():
        params = {k: v[0] for k, v in cloud.method.adapt(feature[None]).items()}
        logits = cloud.method.predict(f_g[None], {k: v[None] for k, v in params.items()})[0]
    return params, logits


@pytest.mark.parametrize("encoding", protocol.ENCODINGS)
def test_round_trip_equals_in_process(server: Any, cloud: CloudModel, bundle: Path, tmp_path: Path,
                                      encoding: str) -> None:
    feature, f_g = _feature(1), _feature(2)
    ref_params, ref_logits = _in_process(cloud, feature, f_g)
    with AdaptClient(server.url, bundle, encoding=encoding, token=TOKEN, timeout=5,
                     cache_dir=tmp_path) as client:
        logits, res = _predict(client, f_g, feature)
    assert res.source == "server" and res.error is None, res.error
    for name in ("weight", "bias"):
        ref = ref_params[name].numpy()
        err = np.abs(res.params[name] - ref)
        if encoding in ("fp32", "factors"):  # factors: FiLM's expansion is elementwise, in the cloud's order
            assert np.array_equal(res.params[name], ref)
        elif encoding == "driver":
            assert float(err.max()) < 1e-5
        else:
            assert bool((err <= protocol.max_error(encoding, ref)).all())
    tol = {"fp32": 1e-5, "factors": 1e-4, "driver": 1e-4, "fp16": 1e-2, "int8": 5e-2}[encoding]
    np.testing.assert_allclose(logits[0], ref_logits.numpy(), atol=tol)
    assert res.bytes_down > 0
    if encoding == "int8":
        assert res.bytes_down < 97 * K * 4  # below the fp32 payload alone, header included


def test_json_upload_and_accept_negotiation(server: Any, cloud: CloudModel) -> None:
    feature = _feature(3)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": f"{protocol.MEDIA_TYPE}; encoding=fp16"}
    r = httpx.post(f"{server.url}/v1/models/easyvqa/adapt", json={"feature": feature.tolist()},
                   headers=headers, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"] == protocol.MEDIA_TYPE
    tensors, header = protocol.decode(r.content, "easyvqa", "7")
    assert header.encoding == "fp16" and r.headers["x-encoding"] == "fp16"
    ref, _ = _in_process(cloud, feature, feature)
    err = np.abs(tensors["weight"] - ref["weight"].numpy())
    assert bool((err <= protocol.max_error("fp16", ref["weight"].numpy())).all())


def test_concurrent_requests_are_batched_and_correct(server: Any, cloud: CloudModel) -> None:
    feats = [_feature(100 + i) for i in range(24)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            return await asyncio.gather(*[
                c.post("/v1/models/easyvqa/adapt", content=uploads.encode_upload(f),
                       headers={"Content-Type": "application/octet-stream"}) for f in feats])

    replies = asyncio.run(run())
    for f, r in zip(feats, replies):
        assert r.status_code == 200
        got, _ = protocol.decode(r.content, "easyvqa", "7")
        ref, _ = _in_process(cloud, f, f)
        torch.testing.assert_close(torch.from_numpy(got["weight"]), ref["weight"], atol=1e-5, rtol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    batch = {s.name: s.value for s in fams["stablesynth_batch_size"].samples}
    # 24 concurrent uploads must not have taken 24 model calls.
    assert batch["stablesynth_batch_size_count"] < batch["stablesynth_batch_size_sum"]
    assert "stablesynth_request_latency_seconds" in fams and "stablesynth_requests" in fams


def _post(server: Any, body: bytes | None = None, *, ctype: str = "application/octet-stream",
          token: str | None = TOKEN, path: str = "/v1/models/easyvqa/adapt",
          **headers: str) -> httpx.Response:
    h = {"Content-Type": ctype, **headers}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return httpx.post(server.url + path, content=body if body is not None else b"\0" * 768, headers=h,
                      timeout=5)


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"body": b"\0" * 767}, 422, "bad_size"),
    ({"body": np.full(192, np.inf, "<f4").tobytes()}, 422, "non_finite"),
    ({"body": b'{"feature": [1, 2]}', "ctype": "application/json"}, 422, "bad_size"),
    ({"body": b"\0" * 768, "ctype": "text/plain"}, 415, "unsupported_media_type"),
    ({"body": b"\0" * 100_000}, 413, "too_large"),
    ({"token": None}, 401, "unauthorized"),
    ({"token": "wrong"}, 401, "unauthorized"),
    ({"path": "/v1/models/nope/adapt"}, 404, "unknown_model"),
    ({"path": "/v1/models/easyvqa/adapt?encoding=bf16"}, 422, "unsupported_encoding"),
    ({"X-Model-Version": "6"}, 409, "version_mismatch"),
    ({"path": "/v1/noop", "body": b"\0" * 10}, 422, "bad_size"),
])
def test_bad_requests_get_documented_errors(server: Any, kwargs: dict, status: int, code: str) -> None:
    r = _post(server, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]


def test_noop_models_health_openapi(server: Any) -> None:
    x = _feature(5)
    r = _post(server, uploads.encode_upload(x), path="/v1/noop")
    assert r.status_code == 200 and np.array_equal(np.frombuffer(r.content, "<f4"), x.numpy())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    models = httpx.get(f"{server.url}/v1/models", headers=auth, timeout=5).json()
    assert models["models"][0]["id"] == "easyvqa" and models["models"][0]["version"] == "7"
    assert httpx.get(f"{server.url}/healthz", timeout=5).json()["status"] == "ok"
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json", timeout=5).json()
    op = spec["paths"]["/v1/models/{model}/adapt"]["post"]
    assert "application/octet-stream" in op["requestBody"]["content"]
    assert protocol.MEDIA_TYPE in op["responses"]["200"]["content"]
    assert "ErrorBody" in json.dumps(op["responses"]["422"])


# ----------------------------------------------------------------------------- faults


class Misbehaving:
    """A loopback ASGI app that answers adapt requests with a damaged copy of a real frame."""

    def __init__(self, cloud: CloudModel, mutate: Callable[[bytes], bytes], delay: float = 0.0) -> None:
        self.cloud, self.mutate, self.delay, self.calls = cloud, mutate, delay, 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        upload = torch.from_numpy(uploads.decode_upload(body, "application/octet-stream"))[None]
        tensors = self.cloud.compute(upload, "fp32")[0]
        frame = self.mutate(framing.encode(tensors, "fp32", self.cloud.model_id, self.cloud.version))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", protocol.MEDIA_TYPE.encode())]})
        await send({"type": "http.response.body", "body": frame})


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


def _other_version(cloud: CloudModel) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        tensors, _ = protocol.decode(data)
        return framing.encode(tensors, "fp32", cloud.model_id, "8")
    return mutate


@pytest.mark.parametrize(("name", "mutate", "delay", "expect"), [
    ("corrupt", _flip, 0.0, "ChecksumMismatch"),
    ("truncated", lambda d: d[: len(d) - 100], 0.0, "Truncated"),
    ("slow", lambda d: d, 1.0, "timeout"),
    ("wrong_version", None, 0.0, "ModelMismatch"),
])
def test_faulty_server_falls_back(live_server: Any, cloud: CloudModel, bundle: Path, tmp_path: Path, name: str,
                                  mutate: Callable | None, delay: float, expect: str) -> None:
    app = Misbehaving(cloud, mutate or _other_version(cloud), delay)
    feature, f_g = _feature(11), _feature(12)
    with live_server(app) as srv, AdaptClient(srv.url, bundle, timeout=0.4 if name == "slow" else 3.0, retries=1,
                                              backoff_s=0.01, cache_dir=tmp_path) as client:
        t0 = time.perf_counter()
        res = client.adapt(feature.numpy())
        elapsed = time.perf_counter() - t0
        logits = DeviceRuntime(client.bundle).predict(f_g.numpy(), res.params["weight"], res.params["bias"])
    assert res.source == "global" and expect in (res.error or ""), res.error
    assert np.array_equal(res.params["weight"], client.bundle.global_params["weight"])
    assert np.isfinite(logits).all() and logits.shape == (1, K)
    # Retries are bounded: a version mismatch is final, the others get exactly 1 + retries attempts
    # (the slow server's one attempt used up the whole deadline).
    assert app.calls == (1 if name in ("wrong_version", "slow") else 2)
    assert elapsed < (0.6 if name == "slow" else 3.0)


def test_server_stopped_mid_run_uses_cache(live_server: Any, cloud: CloudModel, bundle: Path, tmp_path: Path) -> None:
    app = create_app({"easyvqa": cloud})
    srv = live_server(app).__enter__()
    feature, f_g = _feature(21), _feature(22)
    client = AdaptClient(srv.url, bundle, timeout=1.0, retries=1, backoff_s=0.01, cache_dir=tmp_path)
    first = client.adapt(feature.numpy())
    assert first.source == "server"
    srv.stop()
    logits, second = _predict(client, f_g, _feature(23))
    assert second.source == "cache" and "unreachable" in (second.error or "")
    for name in ("weight", "bias"):  # nothing lost: exactly the last good parameters
        assert np.array_equal(second.params[name], first.params[name])
    assert np.isfinite(logits).all()
    # A corrupted cache file is not trusted: the bundle's global parameters take over.
    client.cache_path.write_bytes(b"garbage")
    third = client.adapt(feature.numpy())
    assert third.source == "global" and "cache unreadable" in (third.error or "")
    client.close()


def test_checkpoint_round_trip_serves_same_parameters(method_factory: Any, tmp_path: Path) -> None:
    method = method_factory(seed=3)
    ckpt = save_cloud_model(tmp_path / "ckpt", method, "easyvqa")
    loaded = load_cloud_model(ckpt)
    assert (loaded.model_id, loaded.num_classes) == ("easyvqa", K) and len(loaded.version) == 12
    x = torch.randn(4, 192)
    with torch.inference_mode():
        a, b = method.adapt(x), loaded.method.adapt(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_device_cli_predicts_against_a_live_server(live_server: Any, cloud: CloudModel, bundle: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from stablesynth_device.cli import main

    frames = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "clip.npy", frames)
    args = ["predict", "--bundle", str(bundle), "--npy", str(tmp_path / "clip.npy"), "--question", "is it red?",
            "--json"]
    with live_server(create_app({"easyvqa": cloud})) as srv:
        capsys.readouterr()
        assert main([*args, "--server", srv.url, "--encoding", "factors"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["source"] == "server" and out["error"] is None and out["model"] == "easyvqa@7"
    assert out["answer"] in Bundle.load(bundle).answers and out["bytes_up"] == 768 and out["bytes_down"] > 0
    assert main([*args, "--offline"]) == 0  # the last good Θ_d, cached by the call above
    off = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert off["source"] == "cache" and off["error"] == "offline" and off["answer"] == out["answer"]


def test_worker_thread_path_and_gathering_window(live_server: Any, cloud: CloudModel) -> None:
    """inline_ms=0 sends every batch to the worker thread; max_wait_ms>0 restores the gathering window."""
    feats = [_feature(200 + i) for i in range(16)]
    app = create_app({"easyvqa": cloud}, inline_ms=0.0, max_wait_ms=3.0)

    async def run(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            return await asyncio.gather(*[
                c.post("/v1/models/easyvqa/adapt?encoding=factors", content=uploads.encode_upload(f),
                       headers={"Content-Type": "application/octet-stream"}) for f in feats])

    with live_server(app) as srv:
        replies = asyncio.run(run(srv.url))
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
    for f, r in zip(feats, replies):
        assert r.status_code == 200 and r.headers["x-encoding"] == "factors"
        got, _ = protocol.decode(r.content, "easyvqa", "7")
        with torch.inference_mode():
            ref = cloud.method.generator.factors(cloud.method.driver(f[None]))
        for k, v in ref.items():
            torch.testing.assert_close(torch.from_numpy(got[k]), v[0], atol=1e-6, rtol=1e-6)
    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    batch = {s.name: s.value for s in fams["stablesynth_batch_size"].samples}
    assert batch["stablesynth_batch_size_sum"] == len(feats)
    assert batch["stablesynth_batch_size_count"] < len(feats)


def test_load_generator_counts_replies_and_errors(server: Any) -> None:
    from stablesynth.cloud.loadgen import LoadGenerator

    port = int(server.url.rsplit(":", 1)[1])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = uploads.encode_upload(_feature(7))
    with LoadGenerator("127.0.0.1", port, processes=2) as load:
        ok = load.run("/v1/models/easyvqa/adapt?encoding=factors", body, 40, 4, 10.0, headers=auth)
        bad = load.run("/v1/models/nope/adapt", body, 6, 2, 10.0, headers=auth)
        capped = load.run("/v1/noop", body, 10**6, 2, 0.3, headers=auth)
    assert ok["ok"] == 40 and ok["errors"] == 0 and ok["requests"] == 40
    assert ok["p50_ms"] > 0 and ok["per_s"] > 0 and ok["reply_bytes"] > 97 * 4
    assert bad["ok"] == 0 and bad["error_kinds"] == {"http_404": 6}
    # The time cap bounds a run whatever the request budget.
    assert capped["errors"] == 0 and 0 < capped["ok"] < 10**6 and capped["wall_s"] < 5
