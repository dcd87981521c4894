"""More than one serving process for real: two replicas behind HAProxy through a rolling restart, and
/metrics of ``--workers 2`` counting the requests of both workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stablesynth.cloud.loadgen import LoadGenerator
from stablesynth.cloud.openinference import HEADER_LENGTH
from stablesynth.cloud.server import save_cloud_model
from stablesynth_device.wire import uploads

from .conftest import free_port

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
MODEL = "easyvqa"
DRAIN_S = 5.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, method_factory: Any) -> Path:
    return save_cloud_model(tmp_path_factory.mktemp("ckpt") / MODEL, method_factory(), MODEL)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class Replica:
    """One ``stablesynth serve`` process on a fixed loopback port, started again on the same port on demand."""

    def __init__(self, checkpoint: Path, port: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "stablesynth.cloud.commands", "serve", "--checkpoint", str(checkpoint),
                    "--host", "127.0.0.1", "--port", str(port), *args]
        self.port, self.env = port, env or _env()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if self.ready() == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"replica on port {self.port} not ready after {timeout:.0f} s")

    def ready(self) -> int | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1.0).status_code
        except httpx.HTTPError:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _v2_binary_body() -> tuple[bytes, dict[str, str]]:
    x = uploads.encode_upload([0.5] * 192)
    head = json.dumps({"inputs": [{"name": "feature", "shape": [1, 192], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(x)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + x, {HEADER_LENGTH: str(len(head))}


@pytest.fixture
def replicas(checkpoint: Path) -> Iterator[list[Replica]]:
    reps = [Replica(checkpoint, free_port(), "--drain-timeout", str(DRAIN_S)) for _ in range(2)]
    try:
        for r in reps:
            r.start()
        yield reps
    finally:
        for r in reps:
            r.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rolling_restart_behind_haproxy_fails_no_request(replicas: list[Replica]) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("HAProxy is not installed (Debian/Ubuntu: apt-get install haproxy); the rolling-restart "
                    "test needs its binary")
    lb_port = free_port()
    # No retries in HAProxy: the drain alone must lose no request (with retries it would hide lost ones).
    env = _env(STABLESYNTH_LB_BIND=f"127.0.0.1:{lb_port}", STABLESYNTH_LB_RETRIES="0",
               STABLESYNTH_REPLICA_1=f"127.0.0.1:{replicas[0].port}",
               STABLESYNTH_REPLICA_2=f"127.0.0.1:{replicas[1].port}")
    lb = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    drains: list[dict[str, Any]] = []

    def roll() -> None:
        time.sleep(1.0)  # under load first
        for r in replicas:
            assert r.proc is not None
            t0 = time.monotonic()
            r.proc.send_signal(signal.SIGTERM)
            saw_not_ready = False
            while r.proc.poll() is None and time.monotonic() - t0 < DRAIN_S + 10:
                saw_not_ready |= r.ready() == 503
                time.sleep(0.05)
            drains.append({"seconds": time.monotonic() - t0, "code": r.proc.poll(), "not_ready": saw_not_ready})
            r.start()
            time.sleep(1.0)  # rise 2 checks 200 ms apart: HAProxy sends it traffic again

    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # HAProxy up and both checks passed
            try:
                if httpx.get(f"http://127.0.0.1:{lb_port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        time.sleep(0.6)
        native = uploads.encode_upload([0.25] * 192)
        v2_body, v2_headers = _v2_binary_body()
        roller = threading.Thread(target=roll, daemon=True)
        totals = {"ok": 0, "errors": 0, "kinds": {}}
        with LoadGenerator("127.0.0.1", lb_port, processes=2) as load:
            roller.start()
            chunk = 0
            t_end = time.monotonic() + 90
            while (roller.is_alive() or totals["ok"] < 2000) and time.monotonic() < t_end:
                if chunk % 2 == 0:
                    row = load.run(f"/v1/models/{MODEL}/adapt?encoding=fp32", native, 300, 8, 20.0)
                else:
                    row = load.run(f"/v2/models/{MODEL}/infer", v2_body, 300, 8, 20.0, headers=v2_headers)
                chunk += 1
                totals["ok"] += row["ok"]
                totals["errors"] += row["errors"]
                for k, v in row["error_kinds"].items():
                    totals["kinds"][k] = totals["kinds"].get(k, 0) + v
            roller.join(30)
    finally:
        lb.terminate()
        lb.wait(10)
    print(f"rolling restart: {totals}, drains {drains}")
    assert len(drains) == 2, drains
    assert totals["errors"] == 0 and totals["ok"] >= 2000, totals
    for d in drains:
        # Exits by the drain (uvicorn re-raises the SIGTERM it handled), within the drain timeout.
        assert d["not_ready"] and d["code"] in (0, -signal.SIGTERM) and d["seconds"] < DRAIN_S + 2, drains


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_metrics_of_two_workers_add_up(checkpoint: Path, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    rep = Replica(checkpoint, free_port(), "--workers", "2",
                  env=_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)))
    n = 60
    try:
        rep.start()
        url = f"http://127.0.0.1:{rep.port}"
        body = uploads.encode_upload([0.1] * 192)
        for _ in range(n):  # a fresh connection each: the kernel spreads them over the workers
            with httpx.Client(timeout=10) as c:
                assert c.post(f"{url}/v1/models/{MODEL}/adapt", content=body).status_code == 200
        files = list(metrics_dir.glob("counter_*.db"))
        assert len(files) == 2, files  # both workers answered, and both report through any one of them
        for _ in range(3):  # whichever worker answers the scrape reports all of them
            text = httpx.get(f"{url}/metrics", timeout=10).text
            wanted = {"endpoint": "/v1/models/{model}/adapt", "status": "200"}
            counted = sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "stablesynth_requests"
                          for s in fam.samples if s.name == "stablesynth_requests_total" and s.labels == wanted)
            assert counted == n
    finally:
        if rep.proc is not None and rep.proc.poll() is None:
            rep.proc.send_signal(signal.SIGTERM)
            try:
                rep.proc.wait(20)
            except subprocess.TimeoutExpired:
                rep.stop()
