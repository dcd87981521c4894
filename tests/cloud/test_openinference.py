"""The Open Inference Protocol (KServe V2) routes, spoken by the real Triton HTTP client and by hand for bad input."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from stablesynth.cloud.server import CloudModel, create_app
from stablesynth_device.wire import protocol, uploads

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def auth() -> dict[str, str]:
    """The token header, a fresh dict per call: tritonclient adds its own headers to the dict it is given."""
    return dict(AUTH)

MODEL = "easyvqa"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def server(cloud: CloudModel, live_server: Any) -> Iterator[Any]:
    with live_server(create_app({MODEL: cloud}, token=TOKEN, max_batch=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=10)
    yield c
    c.close()


def _features(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 192)).astype(np.float32)


def _native(server: Any, feature: np.ndarray) -> dict[str, np.ndarray]:
    r = httpx.post(f"{server.url}/v1/models/{MODEL}/adapt?encoding=fp32", content=uploads.encode_upload(feature),
                   headers=AUTH, timeout=10)
    assert r.status_code == 200
    return protocol.decode(r.content)[0]


def _infer(client: triton.InferenceServerClient, x: np.ndarray, binary_in: bool, binary_out: bool) -> Any:
    inp = triton.InferInput("feature", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in ("weight", "bias")]
    return client.infer(MODEL, [inp], outputs=outs, headers=auth())


def test_health_metadata_and_readiness(client: triton.InferenceServerClient, cloud: CloudModel) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=auth())
    assert client.is_model_ready(MODEL, model_version=cloud.version, headers=auth())
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL, headers=auth())
    assert meta["versions"] == [cloud.version]
    assert meta["inputs"] == [{"name": "feature", "datatype": "FP32", "shape": [-1, 192]}]
    assert meta["outputs"] == [{"name": "weight", "datatype": "FP32", "shape": [-1, cloud.num_classes, 96]},
                               {"name": "bias", "datatype": "FP32", "shape": [-1, cloud.num_classes]}]


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False)])
def test_infer_is_bit_identical_to_the_native_route(server: Any, client: triton.InferenceServerClient,
                                                    binary_in: bool, binary_out: bool) -> None:
    x = _features(1, seed=1)
    res = _infer(client, x, binary_in, binary_out)
    weight, bias = res.as_numpy("weight"), res.as_numpy("bias")
    assert weight.dtype == np.float32 and weight.shape == (1, 13, 96) and bias.shape == (1, 13)
    ref = _native(server, x[0])
    assert weight[0].tobytes() == ref["weight"].tobytes() and bias[0].tobytes() == ref["bias"].tobytes()
    assert res.get_response()["model_name"] == MODEL


@pytest.mark.parametrize("binary", [True, False])
def test_a_batch_is_bit_identical_to_the_same_batch_of_native_requests(cloud: CloudModel, live_server: Any,
                                                                       binary: bool) -> None:
    """Θ_d's last bits depend on the batch an upload is computed in (BLAS picks its kernel by batch size), on
    either route; a V2 batch of 3 is one batch of the batcher, as are 3 native requests that wait for each other."""
    x = _features(3, seed=3)
    with live_server(create_app({MODEL: cloud}, token=TOKEN, max_batch=3, max_wait_ms=300)) as srv:
        c = triton.InferenceServerClient(url=f"127.0.0.1:{srv.port}", network_timeout=10)
        try:
            res = _infer(c, x, binary, binary)
        finally:
            c.close()
        with ThreadPoolExecutor(3) as pool:
            refs = list(pool.map(lambda row: _native(srv, row), x))
    for i, ref in enumerate(refs):
        assert res.as_numpy("weight")[i].tobytes() == ref["weight"].tobytes()
        assert res.as_numpy("bias")[i].tobytes() == ref["bias"].tobytes()


def test_all_outputs_in_binary_by_default_and_one_output_alone(client: triton.InferenceServerClient) -> None:
    x = _features(1)
    inp = triton.InferInput("feature", [1, 192], "FP32")
    inp.set_data_from_numpy(x)
    every = client.infer(MODEL, [inp], headers=auth())  # no outputs named: binary_data_output
    assert {o["name"] for o in every.get_response()["outputs"]} == {"weight", "bias"}
    only = client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("bias")], headers=auth())
    assert only.as_numpy("weight") is None
    assert only.as_numpy("bias").tobytes() == every.as_numpy("bias").tobytes()


@pytest.mark.parametrize(("case", "status", "words"), [
    ("unknown model", 404, "no model"),
    ("bad token", 401, "token"),
    ("wrong shape", 400, "shape"),
    ("wrong dtype", 400, "datatype"),
])
def test_client_errors_come_back_as_protocol_errors(client: triton.InferenceServerClient, case: str, status: int,
                                                    words: str) -> None:
    x = _features(1)
    model, headers, shape, dtype = MODEL, auth(), [1, 192], "FP32"
    if case == "unknown model":
        model = "nope"
    elif case == "bad token":
        headers = {"Authorization": "Bearer wrong"}
    elif case == "wrong shape":
        shape, x = [1, 191], x[:, :191]
    else:
        dtype, x = "FP64", x.astype(np.float64)
    inp = triton.InferInput("feature", shape, dtype)
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], headers=headers)
    assert err.value.status() == str(status) and words in err.value.message()


def _post(server: Any, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.url + INFER, content=body, headers={**AUTH, **(headers or {})}, timeout=10)


def _json_request(**overrides: Any) -> dict[str, Any]:
    inp = {"name": "feature", "shape": [1, 192], "datatype": "FP32", "data": _features(1).ravel().tolist()}
    inp.update(overrides.pop("input", {}))
    return {"inputs": [inp], **overrides}


def _binary_request(size: int | None = None, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
    x = _features(1).tobytes()
    head = json.dumps({"inputs": [{"name": "feature", "shape": [1, 192], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(x) if size is None else size}}]}).encode()
    return head + x + extra, {"Inference-Header-Content-Length": str(len(head))}


BAD: dict[str, tuple[Any, dict[str, str], int]] = {
    "malformed json": (b'{"inputs": [', {}, 400),
    "not an object": (b"[1, 2]", {}, 400),
    "datatype": (_json_request(input={"datatype": "INT32"}), {}, 400),
    "shape vs data": (_json_request(input={"shape": [2, 192]}), {}, 400),
    "strings as data": (_json_request(input={"data": ["1.0"] * 192}), {}, 400),
    "booleans as data": (_json_request(input={"data": [True] * 192}), {}, 400),
    "nan": (_json_request(input={"data": [float("nan")] * 192}), {}, 422),
    "out of range": (_json_request(input={"data": [1e30] * 192}), {}, 422),
    "huge integer": (_json_request(input={"data": [10 ** 400] + [0] * 191}), {}, 422),
    "batch above max": (_json_request(input={"shape": [9, 192], "data": [0.0] * 9 * 192}), {}, 400),
    "unknown request parameter": (_json_request(parameters={"priority": 1}), {}, 400),
    "unknown input parameter": (_json_request(input={"parameters": {"shared_memory_region": "x"}}), {}, 400),
    "unknown field": (_json_request(extra=1), {}, 400),
    "unknown input": (_json_request(input={"name": "image"}), {}, 400),
    "unknown output": (_json_request(outputs=[{"name": "logits"}]), {}, 400),
    "output twice": (_json_request(outputs=[{"name": "bias"}, {"name": "bias"}]), {}, 400),
    "binary size vs shape": (*_binary_request(size=700), 400),
    "binary size vs body": (*_binary_request(extra=b"\0" * 4), 400),
    "negative header length": (_binary_request()[0], {"Inference-Header-Content-Length": "-5"}, 400),
    "huge header length": (_binary_request()[0], {"Inference-Header-Content-Length": "99999999999"}, 400),
    "zero header length": (_binary_request()[0], {"Inference-Header-Content-Length": "0"}, 400),
    "oversized": (b"{" + b" " * (70 * 1024) + b"}", {}, 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_protocol_error_and_the_service_keeps_serving(
        server: Any, client: triton.InferenceServerClient, case: str, caplog: pytest.LogCaptureFixture) -> None:
    body, headers, status = BAD[case]
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    with caplog.at_level(logging.WARNING):
        r = _post(server, body, headers)
    assert r.status_code == status, r.text
    err = r.json()
    assert list(err) == ["error"] and isinstance(err["error"], str) and err["error"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert _infer(client, _features(1), True, True).as_numpy("bias").shape == (1, 13)


def test_nested_json_data_is_accepted(server: Any) -> None:
    x = _features(2, seed=7)
    r = _post(server, json.dumps(_json_request(input={"shape": [2, 192], "data": x.tolist()})).encode())
    assert r.status_code == 200
    out = r.json()["outputs"]
    assert [o["shape"] for o in out] == [[2, 13, 96], [2, 13]]
    assert np.isfinite(np.asarray(out[1]["data"], np.float32)).all() and len(out[1]["data"]) == 26


def test_readiness_routes_need_no_token_but_models_do(server: Any) -> None:
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    r = httpx.get(server.url + f"/v2/models/{MODEL}")
    assert r.status_code == 401 and "error" in r.json()
    assert httpx.get(server.url + f"/v2/models/{MODEL}/versions/0/ready", headers=AUTH).status_code == 404
