"""Audit cases: one client cannot break the service, bad input is a 4xx, the device always falls back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablesynth.checkpoint import CheckpointError
from stablesynth.cloud import framing
from stablesynth.cloud.limits import ServeLimits
from stablesynth.cloud.server import CloudModel, create_app, load_cloud_model, save_cloud_model
from stablesynth_device.client import AdaptClient
from stablesynth_device.wire import protocol

URL = "/v1/models/easyvqa/adapt"
LIMITS = ServeLimits(max_header_bytes=4096, header_timeout=0.5, body_timeout=0.5, send_timeout=0.5,
                     keep_alive_timeout=1, limit_concurrency=40)


@pytest.fixture(scope="module")
def server(cloud: CloudModel, live_server: Any) -> Iterator[Any]:
    with live_server(create_app({"easyvqa": cloud}, max_wait_ms=20.0), limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def calm_server(cloud: CloudModel, live_server: Any) -> Iterator[Any]:
    """Default limits: for tests about what a request gets, not about how long a client may take
    (the tight deadlines above could cut a slow but honest client on a loaded machine)."""
    with live_server(create_app({"easyvqa": cloud}, max_wait_ms=20.0), limits=ServeLimits()) as s:
        yield s


def _feature(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(192).astype("<f4")


# ----------------------------------------------------------------------------- isolation, 4xx


def test_bad_uploads_do_not_harm_their_batch(calm_server: Any) -> None:
    """Uploads of 1e37 (finite, once overflowing fusion) among good ones: 422 each, the rest 200."""
    bodies = [np.full(192, 1e37, "<f4").tobytes() if i % 5 == 0 else _feature(i).tobytes() for i in range(30)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=calm_server.url, timeout=30) as c:
            return await asyncio.gather(*[c.post(URL, content=b, headers={"Content-Type": "application/octet-stream"})
                                          for b in bodies])

    replies = asyncio.run(run())
    codes = [r.status_code for r in replies]
    assert codes == [422 if i % 5 == 0 else 200 for i in range(30)], codes
    assert all(r.json()["error"] == "out_of_range" for r in replies if r.status_code == 422)


def test_one_unsendable_output_fails_only_its_own_request(cloud: CloudModel) -> None:
    """Within one batch, the upload whose output exceeds the fp16 range gets 422, the others their frames."""
    import torch

    from stablesynth.cloud.batching import Batcher, OutputError

    class _Hist:
        def observe(self, _: float) -> None: ...

    b = Batcher(cloud, 64, 0.0, None, _Hist())  # type: ignore[arg-type]
    ups = [torch.from_numpy(_feature(i)) for i in range(4)]
    ups[2] = ups[2] * 0 + 9999.0  # within the upload bound, its Θ_d beyond ±65504
    frames = b._frames(ups, "fp16")
    assert isinstance(frames[2], OutputError) and "fp16 range" in str(frames[2])
    assert all(isinstance(f, memoryview) for i, f in enumerate(frames) if i != 2)


@pytest.mark.parametrize(("body", "ctype", "path", "code"), [
    (np.full(192, 1e30, "<f4").tobytes(), "application/octet-stream", URL, "out_of_range"),
    (np.full(192, -3.4e38, "<f4").tobytes(), "application/octet-stream", URL + "?encoding=int8", "out_of_range"),
    (np.full(192, 1e5, "<f4").tobytes(), "application/octet-stream", URL + "?encoding=fp16", "out_of_range"),
    (b'{"feature": [' + b",".join([b"1"] * 191 + [b"1" + b"0" * 400]) + b"]}", "application/json", URL,
     "bad_json"),
    (b'{"feature": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "application/json", URL, "bad_json"),
    (b'{"feature": [' + b",".join([b"NaN"] * 192) + b"]}", "application/json", URL, "non_finite"),
    (b'{"feature": [' + b",".join([b"true"] * 192) + b"]}", "application/json", URL, "bad_json"),
    (b"\xff\xfe" * 10, "application/json", URL, "bad_json"),
    (_feature(0).tobytes(), "application/octet-stream", URL + "?encoding=", "unsupported_encoding"),
    (_feature(0).tobytes(), "application/octet-stream", URL + "?encoding=%00", "unsupported_encoding"),
    (_feature(0).tobytes(), "application/octet-stream", "/v1/noop?bytes=-1", "bad_query"),
    (_feature(0).tobytes(), "application/octet-stream", "/v1/nowhere", "not_found"),
])
def test_malformed_input_is_a_4xx_with_a_json_body(server: Any, body: bytes, ctype: str, path: str,
                                                   code: str) -> None:
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": ctype}, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert r.json()["error"] == code and r.json()["detail"]


def test_sized_noop_reply(server: Any) -> None:
    r = httpx.post(server.url + "/v1/noop?bytes=582000", content=_feature(1).tobytes(),
                   headers={"Content-Type": "application/octet-stream"}, timeout=10)
    assert r.status_code == 200 and len(r.content) == 582000


# ----------------------------------------------------------------------------- connections


def _connect(server: Any) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return s


def _closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``s`` within ``seconds``, and what it sent before."""
    s.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True, data
            data += chunk
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data


def test_idle_partial_head_and_partial_body_connections_are_closed(server: Any) -> None:
    idle = _connect(server)
    partial_head = _connect(server)
    partial_head.sendall(b"POST /v1/noop HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    partial_body = _connect(server)
    partial_body.sendall(b"POST /v1/noop HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: 768\r\n\r\n" + b"\0" * 100)
    t0 = time.monotonic()
    for s in (idle, partial_head, partial_body):
        closed, _ = _closed_within(s, 3.0)
        assert closed
        s.close()
    assert time.monotonic() - t0 < 3.0  # timeouts are 0.5 s here
    # A drip of header bytes does not extend the deadline.
    drip = _connect(server)
    drip.sendall(b"POST /v1/noop HTTP/1.1\r\n")
    t0 = time.monotonic()
    closed = False
    while time.monotonic() - t0 < 3.0 and not closed:
        try:
            drip.sendall(b"X: y\r\n")
        except OSError:
            closed = True
            break
        closed, _ = _closed_within(drip, 0.1)
    drip.close()
    assert closed and time.monotonic() - t0 < 2.0


def test_a_client_that_stops_reading_a_large_reply_is_cut_off(server: Any) -> None:
    """16 MB asked for, nothing read: more than the socket buffers hold waits in the server,
    which aborts the connection send_timeout (0.5 s) later instead of holding it forever."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", server.port))
    body = _feature(4).tobytes()
    s.sendall(b"POST /v1/noop?bytes=16000000 HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(2.0)  # not reading
    closed, data = _closed_within(s, 3.0)
    s.close()
    assert closed and data.startswith(b"HTTP/1.1 200")
    assert len(data) < 16_000_000  # the rest was dropped
    # A client that reads gets all of it.
    r = httpx.post(server.url + "/v1/noop?bytes=16000000", content=body,
                   headers={"Content-Type": "application/octet-stream"}, timeout=10)
    assert r.status_code == 200 and len(r.content) == 16_000_000


def test_oversized_head_gets_431_and_memory_stays_bounded(server: Any) -> None:
    s = _connect(server)
    s.sendall(b"POST /v1/noop HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        while sent < 8 * 1024 * 1024:
            s.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    closed, data = _closed_within(s, 3.0)
    s.close()
    assert closed and data.startswith(b"HTTP/1.1 431") and b"headers_too_large" in data
    assert sent < 8 * 1024 * 1024  # refused long before 8 MB were taken
    # The service is unharmed.
    r = httpx.post(server.url + "/v1/noop", content=_feature(2).tobytes(),
                   headers={"Content-Type": "application/octet-stream"}, timeout=5)
    assert r.status_code == 200


def test_load_beyond_the_concurrency_limit_is_shed_with_503(server: Any) -> None:
    held = [_connect(server) for _ in range(LIMITS.limit_concurrency)]
    try:
        r = httpx.post(server.url + "/v1/noop", content=_feature(3).tobytes(),
                       headers={"Content-Type": "application/octet-stream"}, timeout=5)
        assert r.status_code == 503
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the slots free up as soon as the attacker lets go
        r = httpx.post(server.url + "/v1/noop", content=_feature(3).tobytes(),
                       headers={"Content-Type": "application/octet-stream"}, timeout=5)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200


# ----------------------------------------------------------------------------- decoder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoder_raises_only_protocol_errors(data: st.DataObject) -> None:
    frame = bytearray(framing.encode({"weight": np.ones((3, 4), np.float32), "bias": np.zeros(3, np.float32)},
                                      data.draw(st.sampled_from(protocol.ENCODINGS[:3])), "m", "v"))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos:pos + data.draw(st.integers(1, 64))]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    with contextlib.suppress(protocol.ProtocolError):  # anything else fails the test
        protocol.decode(bytes(frame))


def _frame_with_header(header: dict, payload: bytes = b"") -> bytes:
    import struct
    import zlib

    raw = json.dumps(header).encode()
    return struct.pack("<4sHII", b"SSYN", protocol.PROTOCOL_VERSION, len(raw), zlib.crc32(raw)) + raw + payload


_CRC = {"checksum": "crc32", "payload_checksum": "00000000"}


@pytest.mark.parametrize("header", [
    {"model_id": "m", "model_version": "v", "encoding": "fp32", "payload_length": 0, **_CRC,
     "tensors": [{"name": "w", "dtype": ["f32"], "shape": [0]}]},
    {"model_id": "m", "model_version": "v", "encoding": ["fp32"], "payload_length": 0, **_CRC,
     "tensors": []},
    {"model_id": "m", "model_version": "v", "encoding": "fp32", "payload_length": 0, **_CRC,
     "tensors": [{"name": "w", "dtype": "f32", "shape": [1e300]}]},
    {"model_id": "m", "model_version": "v", "encoding": "int8", "payload_length": 4, **_CRC,
     "tensors": [{"name": "w::scale", "dtype": "f32", "shape": [1]}]},
])
def test_valid_crc_wrong_types_is_a_protocol_error(header: dict) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(_frame_with_header(header, b"\0" * header["payload_length"]))


# ----------------------------------------------------------------------------- device


class _Drip:
    """An ASGI app that answers adapt with a valid status and then one byte every ``gap`` seconds."""

    def __init__(self, gap: float, size: int = 10**9) -> None:
        self.gap, self.size = gap, size

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", protocol.MEDIA_TYPE.encode())]})
        sent = 0
        while sent < self.size:
            chunk = b"S" if self.gap else b"S" * 1_000_000
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
            await asyncio.sleep(self.gap)
        await send({"type": "http.response.body", "body": b""})


def test_a_streamed_reply_left_unread_is_cut_off_while_the_app_still_sends(live_server: Any) -> None:
    """The app streams 1 MB chunks forever; the client reads nothing. The send deadline holds
    while the reply is still being produced (the keep-alive period never starts)."""
    limits = ServeLimits(send_timeout=0.5, keep_alive_timeout=60)
    with live_server(_Drip(0.0), limits=limits) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.0)
        t0 = time.monotonic()
        closed, data = _closed_within(s, 5.0)
        s.close()
    assert closed and data.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 5.0


@pytest.fixture(scope="module")
def bundle(cloud: CloudModel, tmp_path_factory: pytest.TempPathFactory, export_test_bundle: Any) -> Path:
    return export_test_bundle(cloud, tmp_path_factory.mktemp("dev") / "bundle")


@pytest.mark.parametrize(("app", "expect"), [(_Drip(0.3), "deadline"), (_Drip(0.0, 50_000_000), "exceeds the cap")])
def test_device_deadline_and_reply_cap_then_fallback(live_server: Any, bundle: Path, tmp_path: Path, app: Any,
                                                    expect: str) -> None:
    with live_server(app) as srv, AdaptClient(srv.url, bundle, timeout=1.0, retries=2, cache_dir=tmp_path) as c:
        t0 = time.perf_counter()
        res = c.adapt(np.asarray(_feature(4)))
        elapsed = time.perf_counter() - t0
    assert res.source == "global" and expect in (res.error or ""), res.error
    assert elapsed < 1.5


# ----------------------------------------------------------------------------- checkpoints, identity


@pytest.fixture(scope="module")
def ckpt(method_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_cloud_model(tmp_path_factory.mktemp("ck") / "ckpt", method_factory(seed=5), "easyvqa")


def _edited(ckpt: Path, tmp_path: Path, **fields: Any) -> Path:
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(ckpt, d)
    m = json.loads((d / "manifest.json").read_text())
    m.update(fields)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize(("fields", "names"), [
    ({"model_id": "mödel"}, "model_id"),
    ({"model_id": "a\r\nX-Evil: 1"}, "model_id"),
    ({"num_classes": None}, "num_classes"),
    ({"num_classes": "13"}, "num_classes"),
    ({"config": 5}, "config"),
    ({"weights_file": 7}, "weights_file"),
    ({"weights_file": "/etc/passwd"}, "weights_file"),
    ({"weights_file": "../ckpt/model.safetensors"}, "weights_file"),
    ({"tensors": []}, "tensors"),
    ({"config": {"generator": "nope"}}, "config"),
])
def test_bad_manifest_fields_are_one_line_errors_naming_the_field(ckpt: Path, tmp_path: Path, fields: dict,
                                                                  names: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_cloud_model(_edited(ckpt, tmp_path, **fields))
    assert names in str(err.value) and "\n" not in str(err.value)


def test_nan_weight_with_matching_checksum_is_refused(method_factory: Any, tmp_path: Path) -> None:
    import torch

    method = method_factory(seed=6)
    with torch.no_grad():
        next(method.generator.parameters()).view(-1)[0] = float("nan")
    d = save_cloud_model(tmp_path / "nan", method, "easyvqa")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_cloud_model(d)


def test_unsafe_model_id_or_version_refused(cloud: CloudModel) -> None:
    for mid, ver in (("mödel", "1"), ("m", "a\r\nb"), ("", "1")):
        with pytest.raises(ValueError, match="model"):
            CloudModel(cloud.method, mid, ver, cloud.num_classes)


def test_model_version_identifies_weights_and_device_refuses_others(live_server: Any, method_factory: Any,
                                                                    tmp_path: Path, export_test_bundle: Any) -> None:
    ours = load_cloud_model(save_cloud_model(tmp_path / "a", method_factory(seed=7), "easyvqa"))
    other = load_cloud_model(save_cloud_model(tmp_path / "b", method_factory(seed=8, name="f_hyper"), "easyvqa"))
    again = load_cloud_model(save_cloud_model(tmp_path / "c", ours.method, "easyvqa"))
    assert ours.version != other.version and ours.version == again.version
    bundle = export_test_bundle(ours, tmp_path / "bundle")
    with live_server(create_app({"easyvqa": other})) as srv, \
            AdaptClient(srv.url, bundle, timeout=5, cache_dir=tmp_path / "cache") as c:
        res = c.adapt(np.asarray(_feature(9)))
    assert res.source == "global" and "version_mismatch" in (res.error or "")
    assert "refusing" in (res.error or "")


def test_token_from_env_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stablesynth.cloud.commands import TOKEN_ENV, resolve_token

    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token(None, None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert resolve_token(None, tmp_path / "t") == "from-file"
    assert resolve_token("cli", None) == "cli"
    with pytest.raises(ValueError, match="token-file"):
        resolve_token(None, tmp_path / "missing")
    monkeypatch.delenv(TOKEN_ENV)
    assert resolve_token(None, None) is None


def test_cli_errors_are_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stablesynth.cli import main

    bad = _edited(ckpt, tmp_path, num_classes=None)
    assert main(["serve", "--checkpoint", str(bad), "--port", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_classes" in err
    assert main(["serve", "--checkpoint", str(ckpt), "--model-id", "bad id", "--port", "9"]) == 2
    assert "model id" in capsys.readouterr().err
