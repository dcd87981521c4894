"""Hostile connections: disconnects and timeouts are their own label, early replies close, one
address's idle connections cannot starve another's requests."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from stablesynth.cloud.limits import ServeLimits
from stablesynth.cloud.server import CloudModel, create_app

from .conftest import TOKEN

URL = "/v1/models/easyvqa/adapt"
LIMITS = ServeLimits(header_timeout=5.0, body_timeout=0.5, idle_timeout=0.3, keep_alive_timeout=5)
OCTET = {"Content-Type": "application/octet-stream"}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log() -> Iterator[_Records]:
    """Everything the server logs at INFO and above (uvicorn's own loggers do not propagate)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "stablesynth.cloud")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler
    for lg, level in saved:
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture(scope="module")
def server(cloud: CloudModel, live_server: Any) -> Iterator[Any]:
    with live_server(create_app({"easyvqa": cloud}, token=TOKEN), limits=LIMITS) as s:
        yield s


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def _read_until_closed(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    s.settimeout(seconds)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
        return True, data
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data


def _counter(server: Any, status: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    line = 'stablesynth_requests_total{endpoint="/v1/models/{model}/adapt",status="' + status + '"} '
    m = re.search(re.escape(line) + r"(\S+)", text)
    return float(m.group(1)) if m else 0.0


def _head(length: int | None = 768, chunked: bool = False, auth: bool = True) -> bytes:
    lines = [f"POST {URL} HTTP/1.1", "Host: x", "Content-Type: application/octet-stream"]
    if auth:
        lines.append(f"Authorization: Bearer {TOKEN}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize(("case", "label"), [("short", "disconnect"), ("chunked", "disconnect"),
                                            ("stalled", "timeout")])
def test_a_client_gone_mid_body_is_one_info_line_and_its_own_label(server: Any, server_log: _Records,
                                                                   case: str, label: str) -> None:
    before = _counter(server, label)
    s = _connect(server.port)
    if case == "chunked":
        s.sendall(_head(chunked=True) + b"64\r\n" + b"\0" * 100 + b"\r\n")
    else:
        s.sendall(_head() + b"\0" * 100)
    if case == "stalled":  # the body deadline (0.5 s) cuts it off
        closed, _ = _read_until_closed(s, 3.0)
        assert closed
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 3
    while _counter(server, label) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counter(server, label) == before + 1
    assert _counter(server, "500") == 0
    mine = [r for r in server_log.records if r.name == "stablesynth.cloud"]
    assert len(mine) == 1 and mine[0].levelno == logging.INFO and "\n" not in mine[0].getMessage()
    assert label.replace("timeout", "timed out").replace("disconnect", "disconnected") in mine[0].getMessage()
    assert not [r for r in server_log.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(("auth", "status"), [(False, b"401"), (True, b"413")])
def test_a_rejected_request_closes_instead_of_reading_its_body(server: Any, auth: bool, status: bytes) -> None:
    """A declared 4 GiB body: the reply comes at once, then the connection closes (nothing drained)."""
    s = _connect(server.port)
    s.sendall(_head(length=4 << 30, auth=auth) + b"\0" * 1000)
    t0 = time.monotonic()
    closed, data = _read_until_closed(s, 3.0)
    s.close()
    assert closed and time.monotonic() - t0 < 2.0, data[:200]
    assert data.startswith(b"HTTP/1.1 " + status) and b"connection: close" in data.lower()


def test_requests_whose_body_arrived_keep_their_connection(server: Any) -> None:
    """The usual upload (head and body together) is read before its reply: keep-alive stays."""
    s = _connect(server.port)
    body = np.zeros(192, "<f4").tobytes()
    for _ in range(3):
        s.sendall(_head() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
        while len(rest) < length:
            rest += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
    s.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout(server: Any) -> None:
    silent = _connect(server.port)
    talking = _connect(server.port)
    talking.sendall(b"POST /v1/noop HTTP/1.1\r\n")  # the head deadline (5 s) now applies
    t0 = time.monotonic()
    closed, _ = _read_until_closed(silent, 3.0)
    assert closed and time.monotonic() - t0 < 2.0
    assert not _read_until_closed(talking, 0.5)[0]
    silent.close()
    talking.close()


def _open_silent(port: int) -> socket.socket | None:
    s = socket.socket()
    s.setblocking(False)
    s.bind(("127.0.0.1", 0))
    if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
        s.close()
        return None
    return s


def _flood(port: int, n: int, opened: threading.Event, stop: threading.Event, stats: dict[str, int]) -> None:
    """Keep ``n`` connections from 127.0.0.1 open that never send a byte, reopening each one the
    server closes (the attack renews itself), until ``stop`` (or 120 s)."""
    held = [s for s in (_open_silent(port) for _ in range(n)) if s is not None]
    stats["opened"] = len(held)
    opened.set()
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        for i, s in enumerate(held):
            try:
                s.recv(4096)  # a 503 or EOF: the server let go of it
                gone = True
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                s.close()
                fresh = _open_silent(port)
                if fresh is not None:
                    held[i] = fresh
                    stats["reopened"] = stats.get("reopened", 0) + 1
        stop.wait(0.05)
    for s in held:
        s.close()


@pytest.mark.slow
def test_an_idle_flood_from_one_address_does_not_refuse_another(cloud: CloudModel, live_server: Any) -> None:
    """3,000 idle connections from 127.0.0.1 (beyond limit_concurrency 1024 without the per-address
    budget), 200 requests from 127.0.0.2 meanwhile, each on a fresh connection: >= 99 % succeed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8000 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (8000, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 8000:
        pytest.skip("needs 8000 open files")
    limits = ServeLimits(idle_timeout=2.0, header_timeout=5.0)  # the defaults of the budget itself
    stop, opened = threading.Event(), threading.Event()
    stats: dict[str, int] = {}
    with live_server(create_app({"easyvqa": cloud}), limits=limits) as srv:
        flood = threading.Thread(target=_flood, args=(srv.port, 3000, opened, stop, stats), daemon=True)
        flood.start()
        assert opened.wait(30)
        ok = 0
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        body = np.zeros(192, "<f4").tobytes()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", transport=transport, timeout=10,
                              headers={"Connection": "close"}) as c:
                deadline = time.monotonic() + 60
                for _ in range(200):
                    if time.monotonic() > deadline:
                        break
                    with contextlib.suppress(httpx.HTTPError):
                        ok += c.post(URL, content=body, headers=OCTET).status_code == 200
        finally:
            stop.set()
            flood.join(30)
    assert stats["opened"] >= 2900, stats
    assert ok >= 198, (ok, stats)


HOSTILE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,  # a TLS ClientHello on the plain port
    b"GARBAGE\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"POST /v1/noop HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /v1/noop HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/models/%ff/adapt HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/models/easyvqa/adapt HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/models/easyvqa/adapt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
    + b"\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"feat",  # then gone
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01",
]


def test_hostile_bytes_leave_no_error_in_the_log_and_no_500(server: Any, server_log: _Records) -> None:
    for data in HOSTILE:
        s = _connect(server.port)
        with contextlib.suppress(OSError):
            s.sendall(data)
            _read_until_closed(s, 0.3)
        s.close()
    time.sleep(0.3)
    r = httpx.post(server.url + "/v1/noop", content=np.zeros(192, "<f4").tobytes(), timeout=5,
                   headers={**OCTET, "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert 'status="500"' not in httpx.get(server.url + "/metrics", timeout=5).text
    bad = [r.getMessage() for r in server_log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, bad
