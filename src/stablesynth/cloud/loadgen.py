"""A bounded HTTP/1.1 load generator for the serving benchmark (standard library only).

Each worker is a separate process (``python -m stablesynth.cloud.loadgen``) holding
keep-alive connections on raw sockets: it sends one request per connection, reads the
reply by its ``Content-Length``, records the round trip and sends the next, until its
request budget or the time cap runs out. Nothing heavier than ``socket`` and
``selectors`` runs per request, so the clients cost a fraction of what the server does
and the measured rates are the server's, not the client's.

Workers take JSON commands on stdin, one per line, and answer one JSON line on stdout;
:class:`LoadGenerator` spawns them once and spreads each run's connections and requests
over them. Every run is bounded: at most ``requests`` requests, no new request after
``time_cap`` seconds, and replies still missing ``grace`` seconds later count as errors.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")
_RECV = 1 << 20


def build_request(host: str, port: int, path: str, body: bytes,
                  content_type: str = "application/octet-stream",
                  headers: dict[str, str] | None = None) -> bytes:
    """One keep-alive POST, ready to send as is."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Conn:
    __slots__ = ("buf", "need", "sock", "status", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.t0 = 0.0


def _parse_head(conn: _Conn) -> bool:
    """Find the end of the reply's head; sets ``need`` (total reply bytes) and ``status``."""
    end = conn.buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(conn.buf[:end]).decode("latin-1").split("\r\n")
    conn.status = int(head[0].split(" ", 2)[1])
    length = None
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        raise ValueError("reply without Content-Length")
    conn.need = end + 4 + length
    return True


def run_load(host: str, port: int, request: bytes, requests: int, connections: int, time_cap: float,
             start_at: float | None = None, grace: float = 10.0) -> dict[str, Any]:
    """Drive ``connections`` keep-alive connections until ``requests`` replies or ``time_cap`` seconds.

    ``start_at`` is a ``time.monotonic()`` instant (shared by processes on one machine) at
    which to send the first requests, so several workers start together.
    """
    sel = selectors.DefaultSelector()
    conns: list[_Conn] = []
    errors: dict[str, int] = {}
    for _ in range(connections):
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(_Conn(s))
    latencies: list[float] = []
    received = 0
    sent = 0
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    t_start = time.monotonic()
    deadline = t_start + time_cap
    hard_stop = deadline + grace

    def err(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    def drop(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()

    def send(conn: _Conn) -> bool:
        nonlocal sent
        if sent >= requests or time.monotonic() >= deadline:
            return False
        sent += 1
        conn.t0 = time.perf_counter()
        try:
            conn.sock.sendall(request)
        except OSError as exc:
            err(type(exc).__name__)
            return False
        return True

    for conn in conns:
        if send(conn):
            sel.register(conn.sock, selectors.EVENT_READ, conn)
        else:
            conn.sock.close()
    while sel.get_map():
        now = time.monotonic()
        if now >= hard_stop:
            break
        for key, _ in sel.select(timeout=min(1.0, hard_stop - now)):
            conn = key.data
            try:
                data = conn.sock.recv(_RECV)
            except OSError as exc:
                err(type(exc).__name__)
                drop(conn)
                continue
            if not data:
                err("connection_closed")
                drop(conn)
                continue
            conn.buf += data
            try:
                if conn.need < 0 and not _parse_head(conn):
                    continue
            except ValueError:
                err("bad_reply")
                drop(conn)
                continue
            if len(conn.buf) < conn.need:
                continue
            rtt = time.perf_counter() - conn.t0
            received += conn.need
            if conn.status == 200:
                latencies.append(rtt * 1e3)
            else:
                err(f"http_{conn.status}")
            del conn.buf[:conn.need]
            conn.need = -1
            if not send(conn):
                drop(conn)
    t_end = time.monotonic()
    unfinished = len(sel.get_map())
    if unfinished:
        errors["unfinished"] = unfinished
        for key in list(sel.get_map().values()):
            drop(key.data)
    sel.close()
    return {"latencies_ms": latencies, "sent": sent, "errors": errors, "bytes": received,
            "t_start": t_start, "t_end": t_end}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class LoadGenerator:
    """``processes`` worker processes, reused for every run; use as a context manager."""

    def __init__(self, host: str, port: int, processes: int = 2) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.host, self.port = host, port
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.procs = [subprocess.Popen([sys.executable, "-m", "stablesynth.cloud.loadgen"], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for _ in range(processes)]

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(p.pid) for p in self.procs)

    def run(self, path: str, body: bytes, requests: int, concurrency: int, time_cap: float,
            headers: dict[str, str] | None = None,
            content_type: str = "application/octet-stream") -> dict[str, Any]:
        """``requests`` POSTs of ``body`` over ``concurrency`` connections spread over the workers."""
        request = build_request(self.host, self.port, path, body, content_type, headers)
        n = min(len(self.procs), concurrency)
        start_at = time.monotonic() + 0.1 + 0.005 * concurrency
        for i, p in enumerate(self.procs[:n]):
            conns = concurrency // n + (i < concurrency % n)
            reqs = requests // n + (i < requests % n)
            cmd = {"host": self.host, "port": self.port, "request": base64.b64encode(request).decode(),
                   "requests": reqs, "connections": conns, "time_cap": time_cap, "start_at": start_at}
            assert p.stdin is not None
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        parts = []
        for p in self.procs[:n]:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator process {p.pid} exited (code {p.poll()})")
            parts.append(json.loads(line))
        lat = sorted(x for part in parts for x in part["latencies_ms"])
        errors: dict[str, int] = {}
        for part in parts:
            if "failed" in part:
                errors[part["failed"]] = errors.get(part["failed"], 0) + 1
            for k, v in part.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        good = [part for part in parts if "t_start" in part]
        wall = (max(p["t_end"] for p in good) - min(p["t_start"] for p in good)) if good else 0.0
        ok = len(lat)
        return {"requests": sum(p.get("sent", 0) for p in parts), "ok": ok,
                "errors": sum(errors.values()), "error_kinds": errors, "wall_s": wall,
                "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
                "per_s": ok / wall if wall > 0 else 0.0,
                "reply_bytes": sum(p.get("bytes", 0) for p in parts) / max(ok, 1)}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    # Linear interpolation between closest ranks (numpy's default).
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _worker() -> int:
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            res = run_load(cmd["host"], cmd["port"], base64.b64decode(cmd["request"]), cmd["requests"],
                           cmd["connections"], cmd["time_cap"], cmd.get("start_at"))
        except OSError as exc:
            res = {"failed": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
