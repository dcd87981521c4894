"""Serving benchmark: a real server process on loopback under bounded concurrent load.

Rows, all measured in the same run against the same server process:

- ``noop``        request parsing only (``POST /v1/noop``): the HTTP framework's ceiling;
- ``adapt``       the served model (film/low-rank generator, or the given checkpoint), fp32 reply;
- ``duet-full``   DUET's full linear generator at the same K (fp32 reply of 97·K·4 B);
- ``in-process``  ``method.adapt()`` called directly, batch 1 (no HTTP).

Each HTTP row sends a fixed number of requests at a fixed concurrency under a time
cap; it reports p50/p99 latency, adaptations/s, errors and the server's CPU use
(from ``/proc/<pid>/stat``). The load generator runs on the same machine, so on a
small machine it competes with the server for cores: ratios between rows are the
meaningful numbers, absolute throughput is a lower bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_K = 1501
_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _build_models(checkpoint: Path | None, workdir: Path) -> tuple[list[Path], str, str, Any]:
    """Checkpoints to serve (the model under test, DUET's full generator) and the in-process method."""
    from stablesynth.methods.base import METHODS
    from stablesynth.methods.config import MethodConfig
    from stablesynth.serving.server import load_cloud_model, save_cloud_model

    if checkpoint is not None:
        main = load_cloud_model(checkpoint)
        k, main_id, main_dir = main.num_classes, main.model_id, checkpoint
        method = main.method
    else:
        k, main_id = DEFAULT_K, "film"
        torch.manual_seed(0)
        method = METHODS.get("stablesynth")(MethodConfig(generator="film"), k).eval()
        main_dir = save_cloud_model(workdir / "film", method, main_id, "bench")
    torch.manual_seed(1)
    # The same full linear generator DUET uses (Linear(d, 97·K)); the one-frame projector keeps
    # the upload identical to the other rows so only the generator and the reply size differ.
    duet = METHODS.get("f_hyper")(MethodConfig(generator="full"), k).eval()
    duet_dir = save_cloud_model(workdir / "duet-full", duet, "duet-full", "bench")
    return [Path(main_dir), Path(duet_dir)], main_id, "duet-full", method


async def _load(url: str, path: str, body: bytes, requests: int, concurrency: int,
                time_cap: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    bytes_down = 0
    deadline = time.perf_counter() + time_cap
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits,
                                 headers={"Content-Type": "application/octet-stream"}) as client:

        async def worker() -> None:
            nonlocal errors, sent, bytes_down
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, content=body)
                    ok = r.status_code == 200
                    bytes_down += len(r.content)
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return {"requests": sent, "ok": len(latencies), "errors": errors, "wall_s": wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "per_s": len(latencies) / wall if wall > 0 else 0.0,
            "reply_bytes": bytes_down / max(len(latencies), 1)}


def _in_process(method: Any, iters: int = 200) -> dict[str, Any]:
    x = torch.randn(1, 192)
    times = []
    with torch.inference_mode():
        for _ in range(10):
            method.adapt(x)
        for _ in range(iters):
            t0 = time.perf_counter()
            method.adapt(x)
            times.append(time.perf_counter() - t0)
    t = np.asarray(times) * 1e3
    return {"requests": iters, "ok": iters, "errors": 0, "p50_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)), "per_s": 1e3 / float(np.mean(t)), "server_cpu": None,
            "reply_bytes": 0}


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f} s")


def run_serve_benchmark(checkpoint: Path | None, out: Path | None, requests: int = 300,
                        concurrency: list[int] | None = None, time_cap_s: float = 20.0) -> dict[str, Any]:
    """Run the serving benchmark; returns (and writes to ``out``/serve.json) the measurements."""
    from stablesynth.serving import protocol

    concurrency = concurrency or [1, 8, 64]
    body = protocol.encode_upload(torch.randn(192, generator=torch.Generator().manual_seed(0)))
    results: dict[str, Any] = {"requests": requests, "concurrency": concurrency, "rows": []}
    with tempfile.TemporaryDirectory(prefix="stablesynth-bench-") as tmp:
        ckpts, main_id, duet_id, method = _build_models(checkpoint, Path(tmp))
        results["num_classes"] = int(method.num_classes) if hasattr(method, "num_classes") else None
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "stablesynth.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        for c in ckpts:
            cmd += ["--checkpoint", str(c)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_ready(url, proc)
            targets = [("noop", "/v1/noop"), ("adapt", f"/v1/models/{main_id}/adapt?encoding=fp32"),
                       ("duet-full", f"/v1/models/{duet_id}/adapt?encoding=fp32")]
            for conc in concurrency:
                for name, path in targets:
                    asyncio.run(_load(url, path, body, min(requests, 4 * conc), conc, time_cap_s))  # warm-up
                    cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
                    row = asyncio.run(_load(url, path, body, requests, conc, time_cap_s))
                    row["server_cpu"] = (_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
                    results["rows"].append({"name": name, "concurrency": conc, **row})
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        results["rows"].append({"name": "in-process", "concurrency": 1, **_in_process(method)})
    results["ratios"] = _ratios(results["rows"])
    print(format_table(results))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by = {(r["name"], r["concurrency"]): r for r in rows}
    out: dict[str, dict[str, float]] = {}
    for (name, conc), r in by.items():
        if name != "adapt":
            continue
        noop, duet = by.get(("noop", conc)), by.get(("duet-full", conc))
        out[str(conc)] = {
            "adapt/noop p50": r["p50_ms"] / noop["p50_ms"] if noop else float("nan"),
            "adapt/duet-full p50": r["p50_ms"] / duet["p50_ms"] if duet else float("nan"),
            "adapt/duet-full per_s": r["per_s"] / duet["per_s"] if duet and duet["per_s"] else float("nan"),
        }
    return out


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'row':<11} {'conc':>4} {'ok':>5} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} {'adapt/s':>9} "
             f"{'reply B':>8} {'srv CPU':>7}"]
    for r in results["rows"]:
        cpu = "" if r.get("server_cpu") is None else f"{r['server_cpu']:.2f}"
        lines.append(f"{r['name']:<11} {r['concurrency']:>4} {r['ok']:>5} {r['errors']:>4} {r['p50_ms']:>8.2f} "
                     f"{r['p99_ms']:>8.2f} {r['per_s']:>9.1f} {r['reply_bytes']:>8.0f} {cpu:>7}")
    for conc, ratio in results.get("ratios", {}).items():
        lines.append(f"concurrency {conc}: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratio.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    args = p.parse_args(argv)
    run_serve_benchmark(args.checkpoint, args.out, args.requests, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
