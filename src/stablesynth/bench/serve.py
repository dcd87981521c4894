"""Serving benchmark: a real server process on loopback under bounded concurrent load.

Rows, all measured in the same run against the same server process:

- ``noop``        request parsing only (``POST /v1/noop``): the HTTP framework's ceiling;
- ``adapt``       the served model (film generator, or the given checkpoint) replying with its
                  generator's factors (``encoding=factors``): what a device that caches the
                  shared base asks for, and the primary row;
- ``adapt-fp32``  the same model replying with Θ_d itself in fp32 (97·K·4 B, the paper's reply);
- ``adapt-fp16``, ``adapt-int8``  Θ_d in the compact encodings;
- ``noop-fp32``, ``noop-fp16``, ``noop-int8``  ``/v1/noop?bytes=N`` with N the size of that
                  encoding's reply: moving the same bytes with no model call, checksum or
                  serialisation, so each encoding's row is judged against its own size;
- ``v2-binary``   the same Θ_d (fp32) through the Open Inference Protocol (``POST /v2/models/{m}/infer``),
                  upload and outputs in the binary tensor extension: judged against ``adapt-fp32``;
- ``v2-json``     the same with JSON tensors in and out (145,597 numbers of text per reply at K = 1501);
- ``duet-full``   DUET's full linear generator at the same K; its factors are Θ_d, so its reply is
                  the fp32 Θ_d whatever the device asks for;
- ``in-process``  ``method.adapt()`` called directly, batch 1, one PyTorch thread (no HTTP).

The load comes from separate worker processes on raw keep-alive sockets
(:mod:`stablesynth.cloud.loadgen`), so the client costs far less than the server and the
rates are the server's. Each HTTP row sends a fixed number of requests at a fixed
concurrency under a time cap, after a short warm-up; it reports p50/p99 round trip,
adaptations/s, errors and the CPU use of server and clients (``/proc/<pid>/stat``), with the
server's CPU per request split off for its worker thread (model calls, reply encoding; the
rest is the event loop: HTTP and sending). Client and server share the machine, so absolute
rates are lower bounds; ratios between rows of the same run are the meaningful numbers. The
last lines give a verdict per goal.
"""

from __future__ import annotations

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


def _worker_cpu_seconds(pid: int) -> float:
    """CPU seconds of the server's threads other than its main (event-loop) thread: the model
    calls and reply encoding, which run in the batcher's worker thread."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if tid != str(pid):
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def _build_models(checkpoint: Path | None, workdir: Path) -> tuple[list[Path], str, str, Any]:
    """Checkpoints to serve (the model under test, DUET's full generator) and the in-process method."""
    from stablesynth.cloud.server import load_cloud_model, save_cloud_model
    from stablesynth.methods.base import METHODS
    from stablesynth.methods.config import MethodConfig

    if checkpoint is not None:
        main = load_cloud_model(checkpoint)
        k, main_id, main_dir = main.num_classes, main.model_id, checkpoint
        method = main.method
    else:
        k, main_id = DEFAULT_K, "film"
        torch.manual_seed(0)
        method = METHODS.get("stablesynth")(MethodConfig(generator="film"), k).eval()
        main_dir = save_cloud_model(workdir / "film", method, main_id)
    torch.manual_seed(1)
    # The same full linear generator DUET uses (Linear(d, 97·K)); the one-frame projector keeps
    # the upload identical to the other rows so only the generator and the reply size differ.
    duet = METHODS.get("f_hyper")(MethodConfig(generator="full"), k).eval()
    duet_dir = save_cloud_model(workdir / "duet-full", duet, "duet-full")
    return [Path(main_dir), Path(duet_dir)], main_id, "duet-full", method


def _in_process(method: Any, iters: int = 300) -> dict[str, Any]:
    x = torch.randn(1, 192)
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs it
    try:
        with torch.inference_mode():
            for _ in range(20):
                method.adapt(x)
            for _ in range(iters):
                t0 = time.perf_counter()
                method.adapt(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    t = np.asarray(times) * 1e3
    return {"requests": iters, "ok": iters, "errors": 0, "p50_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)), "per_s": 1e3 / float(np.median(t)), "server_cpu": None,
            "client_cpu": None, "reply_bytes": 0}


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


#: Goals of the serving benchmark (K = 1501): throughput ratios and the c = 1 round trip.
GOAL_NOOP_RATIO = 0.85  # factors vs the 768 B no-op
GOAL_SAME_SIZE_RATIO = 0.8  # each Θ_d encoding vs the no-op of its reply's size
GOAL_DUET_RATIO = 5.0  # compact encodings vs DUET's full generator
GOAL_P50_MS = 2.0
#: The V2 binary route against the native fp32 route (the same Θ_d): p50 at c = 1, adaptations/s at the top c.
GOAL_V2_P50_RATIO = 1.3
GOAL_V2_RATE_RATIO = 0.75
#: Rows judged against the goals, and the no-op row each is compared with.
JUDGED = {"adapt": "noop", "adapt-fp32": "noop-fp32", "adapt-fp16": "noop-fp16", "adapt-int8": "noop-int8"}
#: Rows that must beat DUET-full by GOAL_DUET_RATIO (the compact replies).
COMPACT = ("adapt", "adapt-int8")


def _reply_sizes(method: Any, model_id: str) -> dict[str, int]:
    """Bytes of the fp32/fp16/int8 replies of ``method`` (header included; the version is 12 hex digits)."""
    from stablesynth.cloud import framing

    with torch.inference_mode():
        params = {k: v[0] for k, v in method.adapt(torch.zeros(1, 192)).items()}
    return {enc: len(framing.encode(params, enc, model_id, "0" * 12)) for enc in ("fp32", "fp16", "int8")}


def v2_requests() -> dict[str, tuple[bytes, dict[str, str], str]]:
    """The V2 rows' requests for the benchmark's upload: body, extra headers, content type."""
    from stablesynth.cloud.openinference import HEADER_LENGTH, INPUT_NAME
    from stablesynth_device.wire import uploads

    x = torch.randn(192, generator=torch.Generator().manual_seed(0))
    raw = uploads.encode_upload(x)
    head = json.dumps({"inputs": [{"name": INPUT_NAME, "shape": [1, 192], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    as_json = json.dumps({"inputs": [{"name": INPUT_NAME, "shape": [1, 192], "datatype": "FP32",
                                      "data": np.frombuffer(raw, "<f4").tolist()}]}).encode()
    return {"v2-binary": (head + raw, {HEADER_LENGTH: str(len(head))}, "application/octet-stream"),
            "v2-json": (as_json, {}, "application/json")}


def run_serve_benchmark(checkpoint: Path | None, out: Path | None, requests: int = 300,
                        concurrency: list[int] | None = None, time_cap_s: float = 20.0,
                        clients: int = 2, warmup: int | None = None) -> dict[str, Any]:
    """Run the serving benchmark; returns (and writes to ``out``/serve.json) the measurements.

    ``clients`` load-generator processes share each row's connections; ``warmup`` requests
    (default ``min(requests, max(50, 4 * concurrency))``) precede each measured row.
    """
    from stablesynth.cloud.loadgen import LoadGenerator
    from stablesynth_device.wire import uploads

    concurrency = concurrency or [1, 8, 64]
    body = uploads.encode_upload(torch.randn(192, generator=torch.Generator().manual_seed(0)))
    results: dict[str, Any] = {"requests": requests, "concurrency": concurrency, "clients": clients,
                               "time_cap_s": time_cap_s, "rows": []}
    with tempfile.TemporaryDirectory(prefix="stablesynth-bench-") as tmp:
        ckpts, main_id, duet_id, method = _build_models(checkpoint, Path(tmp))
        results["num_classes"] = int(method.num_classes) if hasattr(method, "num_classes") else None
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        # The load generator is one client address: the per-address budget must not shed it.
        cmd = [sys.executable, "-m", "stablesynth.cloud.commands", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--max-connections-per-client", str(max(1024, *concurrency))]
        for c in ckpts:
            cmd += ["--checkpoint", str(c)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_ready(url, proc)
            sizes = _reply_sizes(method, main_id)
            targets = [("noop", "/v1/noop"), ("adapt", f"/v1/models/{main_id}/adapt?encoding=factors")]
            for enc in ("fp32", "fp16", "int8"):
                targets += [(f"noop-{enc}", f"/v1/noop?bytes={sizes[enc]}"),
                            (f"adapt-{enc}", f"/v1/models/{main_id}/adapt?encoding={enc}")]
            targets.append(("duet-full", f"/v1/models/{duet_id}/adapt?encoding=fp32"))
            v2 = v2_requests()
            targets += [(name, f"/v2/models/{main_id}/infer") for name in v2]
            with LoadGenerator("127.0.0.1", port, processes=clients) as load:
                for conc in concurrency:
                    for name, path in targets:
                        req_body, headers, ctype = v2.get(name, (body, {}, "application/octet-stream"))
                        n_warm = warmup if warmup is not None else min(requests, max(50, 4 * conc))
                        load.run(path, req_body, n_warm, conc, time_cap_s, headers, ctype)
                        cpu0, ccpu0 = _cpu_seconds(proc.pid), load.cpu_seconds()
                        wcpu0 = _worker_cpu_seconds(proc.pid)
                        row = load.run(path, req_body, requests, conc, time_cap_s, headers, ctype)
                        # CPU seconds over the load window (connection set-up is outside it but cheap).
                        srv, cli = _cpu_seconds(proc.pid) - cpu0, load.cpu_seconds() - ccpu0
                        wall = max(row["wall_s"], 1e-9)
                        row["server_cpu"], row["client_cpu"] = srv / wall, cli / wall
                        row["server_us_per_req"] = 1e6 * srv / max(row["ok"] + row["errors"], 1)
                        row["worker_us_per_req"] = (1e6 * (_worker_cpu_seconds(proc.pid) - wcpu0)
                                                    / max(row["ok"] + row["errors"], 1))
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
    results["verdicts"] = verdicts(results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by = {(r["name"], r["concurrency"]): r for r in rows}
    out: dict[str, dict[str, float]] = {}
    for (name, conc), r in by.items():
        if name not in JUDGED:
            continue
        noop, duet = by.get((JUDGED[name], conc)), by.get(("duet-full", conc))
        out.setdefault(str(conc), {}).update({
            f"{name}/{JUDGED[name]} per_s": r["per_s"] / noop["per_s"] if noop and noop["per_s"] else float("nan"),
            f"{name}/duet-full per_s": r["per_s"] / duet["per_s"] if duet and duet["per_s"] else float("nan"),
        })
    return out


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per goal and judged row: throughput at the highest concurrency, p50 at c = 1, errors."""
    rows = results["rows"]
    by = {(r["name"], r["concurrency"]): r for r in rows}
    http = [r for r in rows if r["name"] != "in-process"]
    top = max(r["concurrency"] for r in http) if http else None
    out: list[dict[str, Any]] = []
    for name, base in JUDGED.items():
        r, noop, duet = by.get((name, top)), by.get((base, top)), by.get(("duet-full", top))
        goal = GOAL_NOOP_RATIO if base == "noop" else GOAL_SAME_SIZE_RATIO
        if r and noop and noop["per_s"]:
            ratio = r["per_s"] / noop["per_s"]
            out.append({"goal": f"adapt/s >= {goal} x {base}", "row": name, "met": ratio >= goal,
                        "detail": f"c={top}: {r['per_s']:.0f}/s vs {base} {noop['per_s']:.0f}/s = {ratio:.2f}x"})
        if name in COMPACT and r and duet and duet["per_s"]:
            ratio = r["per_s"] / duet["per_s"]
            out.append({"goal": f"adapt/s >= {GOAL_DUET_RATIO:g} x duet-full", "row": name,
                        "met": ratio >= GOAL_DUET_RATIO,
                        "detail": f"c={top}: {r['per_s']:.0f}/s vs duet-full {duet['per_s']:.0f}/s = {ratio:.2f}x"})
        one = by.get((name, 1))
        if name not in ("adapt", "adapt-fp32"):
            continue
        if one:
            out.append({"goal": f"p50 <= {GOAL_P50_MS:g} ms at c=1", "row": name, "met": one["p50_ms"] <= GOAL_P50_MS,
                        "detail": f"p50 {one['p50_ms']:.2f} ms (noop {by[('noop', 1)]['p50_ms']:.2f} ms)"
                        if ("noop", 1) in by else f"p50 {one['p50_ms']:.2f} ms"})
        else:
            out.append({"goal": f"p50 <= {GOAL_P50_MS:g} ms at c=1", "row": name, "met": False,
                        "detail": "not measured (concurrency 1 not in the run)"})
    native, binary, one_native, one_binary = (by.get(("adapt-fp32", top)), by.get(("v2-binary", top)),
                                              by.get(("adapt-fp32", 1)), by.get(("v2-binary", 1)))
    if native and binary and native["per_s"]:
        ratio = binary["per_s"] / native["per_s"]
        out.append({"goal": f"adapt/s >= {GOAL_V2_RATE_RATIO} x adapt-fp32", "row": "v2-binary",
                    "met": ratio >= GOAL_V2_RATE_RATIO,
                    "detail": f"c={top}: {binary['per_s']:.0f}/s vs adapt-fp32 {native['per_s']:.0f}/s = {ratio:.2f}x"})
    if one_native and one_binary:
        ratio = one_binary["p50_ms"] / one_native["p50_ms"]
        out.append({"goal": f"p50 <= {GOAL_V2_P50_RATIO} x adapt-fp32 at c=1", "row": "v2-binary",
                    "met": ratio <= GOAL_V2_P50_RATIO,
                    "detail": f"p50 {one_binary['p50_ms']:.2f} ms vs {one_native['p50_ms']:.2f} ms = {ratio:.2f}x"})
    errs = sum(r["errors"] for r in http)
    out.append({"goal": "zero errors", "row": "all", "met": errs == 0,
                "detail": f"{errs} errors in {sum(r['requests'] for r in http)} requests"})
    return out


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'row':<11} {'conc':>4} {'ok':>6} {'err':>4} {'p50 ms':>7} {'p99 ms':>7} {'adapt/s':>8} "
             f"{'reply B':>8} {'srv CPU':>7} {'srv µs/req':>10} {'of which worker':>15} {'cli CPU':>7}"]
    for r in results["rows"]:
        cpu = "" if r.get("server_cpu") is None else f"{r['server_cpu']:.2f}"
        per = "" if r.get("server_us_per_req") is None else f"{r['server_us_per_req']:.0f}"
        work = "" if r.get("worker_us_per_req") is None else f"{r['worker_us_per_req']:.0f}"
        ccpu = "" if r.get("client_cpu") is None else f"{r['client_cpu']:.2f}"
        lines.append(f"{r['name']:<11} {r['concurrency']:>4} {r['ok']:>6} {r['errors']:>4} "
                     f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['per_s']:>8.1f} {r['reply_bytes']:>8.0f} "
                     f"{cpu:>7} {per:>10} {work:>15} {ccpu:>7}")
    for conc, ratio in results.get("ratios", {}).items():
        lines.append(f"c={conc}: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratio.items()))
    for v in results.get("verdicts", []):
        lines.append(f"{'MET    ' if v['met'] else 'NOT MET'}  {v['goal']:<26} [{v['row']}] {v['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from stablesynth_device.argtypes import OneLineParser, existing_dir, int_at_least, output_dir, positive_float

    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=existing_dir("--checkpoint"), default=None)
    p.add_argument("--out", type=output_dir("--out"), default=None)
    p.add_argument("--requests", type=int_at_least("--requests", 1), default=300)
    p.add_argument("--concurrency", type=int_at_least("--concurrency", 1), nargs="+", default=[1, 8, 64])
    p.add_argument("--clients", type=int_at_least("--clients", 1), default=2, help="load-generator processes")
    p.add_argument("--time-cap", type=positive_float("--time-cap"), default=20.0, help="seconds per row")
    args = p.parse_args(argv)
    results = run_serve_benchmark(args.checkpoint, args.out, args.requests, args.concurrency, args.time_cap,
                                  args.clients)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
