"""``stablesynth bench device``: what the device half costs on this machine, against PyTorch in the same run.

Rows, per encoder preset (``allinone-cpu-stem`` from the demo's bundle, ``allinone-ti`` at the paper's
size with random weights, since latency does not depend on their values):

- bundle size with the fp32 encoder and with the int8 one;
- encoder latency per clip (N_f frames, one question) p50/p99 for ONNX Runtime fp32, int8 and PyTorch
  eager, at 1 thread and at every core, on the same clips;
- head latency per clip (ONNX Runtime and PyTorch);
- the device process's peak RSS (``stablesynth-device predict --offline`` in a child process);
- the installed size of a device-only environment (``pip install ./device``) against the full one;
- int8 against fp32 accuracy, with its interval, as measured on the real-time split at export;
- the round trip (upload one frame, download Θ_d) over a link shaped to the paper's Table 5
  bandwidths: the server and the device in a network namespace of their own, its loopback shaped by
  ``tc`` (tbf). Where namespaces or ``tc`` are not permitted the rows say so and are skipped.

Results go to ``OUT/device.json``; the table in docs/device.md is copied from a run of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stablesynth.presets import PAPER_BANDWIDTHS_MBPS

REPO_DEVICE = Path(__file__).resolve().parents[3] / "device"


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(samples)}


def _time(fn: Any, iters: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return _percentiles(out)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _bundle_sizes(bundle: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    total = sum(sizes.values())
    return {"fp32": total - sizes.get("encoder.int8.onnx", 0),
            "int8": total - sizes.get("encoder.onnx", 0) if "encoder.int8.onnx" in sizes else None,
            "files": sizes}


def _encoder_rows(encoder_onnx: Path, encoder_int8: Path | None, encoder: torch.nn.Module, frames: int,
                  iters: int, threads: list[int]) -> dict[str, Any]:
    """Per-clip encoder latency: ONNX Runtime fp32 / int8 and PyTorch eager on the same inputs."""
    import onnxruntime as ort

    from stablesynth.models.global_model import encode_frames

    cfg = encoder.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, 3, cfg.image_size, cfg.image_size, generator=g)
    length = min(16, cfg.max_text_len)
    ids = torch.randint(0, 30, (1, length), generator=g)
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, length - 3:] = 0
    feeds = {"frames": x.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    rows: dict[str, Any] = {}
    saved = torch.get_num_threads()
    for t in threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = t, 1, 3
        sessions = {"onnx_fp32": encoder_onnx, "onnx_int8": encoder_int8}
        row: dict[str, Any] = {}
        for name, path in sessions.items():
            if path is None:
                continue
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            row[name] = _time(lambda s=sess: s.run(None, feeds), iters)
        torch.set_num_threads(t)
        with torch.inference_mode():
            row["pytorch_eager"] = _time(lambda: encode_frames(encoder, x, ids, mask), iters)
        row["onnx_fp32_over_pytorch"] = row["onnx_fp32"]["p50_ms"] / row["pytorch_eager"]["p50_ms"]
        if "onnx_int8" in row:
            row["int8_speedup_over_fp32"] = row["onnx_fp32"]["p50_ms"] / row["onnx_int8"]["p50_ms"]
        rows[f"threads_{t}"] = row
    torch.set_num_threads(saved)
    return rows


#: Runs the device CLI, then reports the process's high-water RSS. VmHWM belongs to the address space
#: exec created, whereas a child's ru_maxrss also counts the parent it was forked from (here, with torch).
_RSS_WRAPPER = ("import sys\nfrom stablesynth_device.cli import main\nrc = main(sys.argv[1:])\n"
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
                "print('VMHWM_KB', hwm, file=sys.stderr)\nraise SystemExit(rc)\n")


def _peak_rss(bundle: Path, question: str, frames: np.ndarray, python: Path) -> dict[str, Any]:
    """Peak RSS (MB) of one ``stablesynth-device predict --offline`` in the device environment."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "clip.npy", frames)
        clip = str(Path(tmp) / "clip.npy")
        cmd = [str(python), "-c", _RSS_WRAPPER, "predict", "--bundle", str(bundle), "--npy", clip,
               "--question", question, "--offline", "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True)
    hwm = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("VMHWM_KB")]
    return {"peak_rss_mb": int(hwm[0]) / 1024 if hwm else None, "exit": r.returncode,
            "answer": json.loads(r.stdout)["answer"] if r.returncode == 0 else None}


def _device_env(path: Path | None) -> tuple[Path, bool]:
    """A device-only environment: ``path`` if given, else a fresh one with ``pip install ./device``."""
    if path is not None:
        return path, False
    venv = Path(tempfile.mkdtemp(prefix="ssdev-")) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(REPO_DEVICE)], check=True)
    return venv, True


def _shaped_round_trips(checkpoint: Path, bundle: Path, device_python: Path, requests: int) -> dict[str, Any]:
    """Round trips over a loopback shaped by tbf, in a network namespace of its own (needs root)."""
    ns = f"ssbench{os.getpid()}"

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True)

    if not shutil.which("ip") or not shutil.which("tc"):
        return {"skipped": "the ip and tc commands (iproute2) are not installed"}
    made = sh("ip", "netns", "add", ns)
    if made.returncode != 0:
        return {"skipped": f"cannot create a network namespace here: {made.stderr.strip()}"}
    rows: dict[str, Any] = {}
    server = None
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        port = "8765"
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "stablesynth.cli", "serve",
                                   "--checkpoint", str(checkpoint), "--port", port], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        probe = ("import sys, time, json, numpy as np\n"
                 "from stablesynth_device.client import AdaptClient\n"
                 "enc, n = sys.argv[2], int(sys.argv[3])\n"
                 "for _ in range(600):\n"
                 "    try:\n"
                 "        import httpx; httpx.get('http://127.0.0.1:" + port + "/readyz', timeout=1).raise_for_status()"
                 "; break\n"
                 "    except Exception: time.sleep(0.1)\n"
                 "c = AdaptClient('http://127.0.0.1:" + port + "', sys.argv[1], encoding=enc, timeout=30, retries=0)\n"
                 "x = np.random.default_rng(0).standard_normal(192).astype(np.float32)\n"
                 "ms = []; src = set(); down = 0\n"
                 "for _ in range(n):\n"
                 "    r = c.adapt(x); ms.append(r.latency_ms); src.add(r.source); down = r.bytes_down\n"
                 "print(json.dumps({'p50_ms': float(np.percentile(ms, 50)), 'p99_ms': float(np.percentile(ms, 99)),"
                 " 'sources': sorted(src), 'bytes_down': down}))\n")
        for mbps in (None, *PAPER_BANDWIDTHS_MBPS):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root")
            if mbps is not None:
                rate = f"{mbps * 8 * 1.048576:.3f}mbit"  # the paper's MB/s are 1024·1024 bytes
                shaped = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                            "burst", "32kb", "latency", "400ms")
                if shaped.returncode != 0:
                    return {"skipped": f"tc cannot shape the link here: {shaped.stderr.strip()}"}
            for enc in ("fp32", "int8"):
                r = sh("ip", "netns", "exec", ns, str(device_python), "-c", probe, str(bundle), enc, str(requests))
                key = f"{'unshaped' if mbps is None else f'{mbps:g}MBps'}_{enc}"
                rows[key] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:]}
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        sh("ip", "netns", "del", ns)
    return rows


def run_device_benchmark(bundle: Path, checkpoint: Path | None, out: Path, iters: int = 50,
                         device_venv: Path | None = None, requests: int = 20, ti: bool = True) -> dict[str, Any]:
    from stablesynth.cloud.clip import load_encoder
    from stablesynth.cloud.export import export_encoder_onnx, quantise_int8
    from stablesynth.models.encoder import create_model
    from stablesynth_device.bundle import Bundle

    b = Bundle.load(bundle)
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    pre = b.preprocessing
    machine = {"cores": cores, "python": sys.version.split()[0], "torch": torch.__version__}
    results: dict[str, Any] = {"machine": machine,
                               "bundle": str(bundle), "model": f"{b.model_id}@{b.model_version}", "presets": {}}
    run_dir = checkpoint.resolve().parent.parent if checkpoint else None
    steps = [("allinone-cpu-stem (demo bundle)", "stem")] + ([("allinone-ti", "ti")] if ti else [])
    for label, kind in tqdm(steps, desc="bench device", unit="preset"):
        if kind == "stem":
            if run_dir is None:
                continue
            stage1, _ = load_encoder(run_dir)
            encoder = stage1.encoder.eval()
            rows = _encoder_rows(b.file("encoder.onnx"), b.file("encoder.int8.onnx") if b.has("encoder.int8.onnx")
                                 else None, encoder, pre.frames_per_clip, iters, threads)
            results["presets"][label] = {"frames": pre.frames_per_clip, "bundle_bytes": _bundle_sizes(bundle),
                                         "encoder": rows}
        else:
            encoder = create_model("allinone-ti").eval()
            with tempfile.TemporaryDirectory() as tmp:
                kept = torch.arange(64)
                export_encoder_onnx(encoder, Path(tmp) / "e.onnx", kept)
                quantise_int8(Path(tmp) / "e.onnx", Path(tmp) / "e8.onnx")
                sizes = {"encoder_fp32": (Path(tmp) / "e.onnx").stat().st_size,
                         "encoder_int8": (Path(tmp) / "e8.onnx").stat().st_size}
                rows = _encoder_rows(Path(tmp) / "e.onnx", Path(tmp) / "e8.onnx", encoder, 3, max(10, iters // 5),
                                     threads)
            results["presets"][label] = {"frames": 3, "encoder_bytes": sizes, "encoder": rows,
                                         "note": "random weights (no trained allinone-ti here): latency only"}
    # The head, one clip.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(b.file("head.onnx")), providers=["CPUExecutionProvider"])
    f_g = np.zeros((1, b.feature_dim), np.float32)
    w, bias = b.global_params["weight"], b.global_params["bias"]
    results["head"] = {"onnx": _time(lambda: sess.run(None, {"f_g": f_g, "weight": w, "bias": bias}), 500)}
    venv, fresh = _device_env(device_venv)
    try:
        full = Path(sys.prefix)
        results["install"] = {"device_env_bytes": _dir_bytes(venv), "full_env_bytes": _dir_bytes(full),
                              "device_env": str(venv), "full_env": str(full)}
        results["install"]["ratio"] = results["install"]["device_env_bytes"] / results["install"]["full_env_bytes"]
        clip = (np.random.default_rng(0).random((pre.frames_per_clip, pre.image_size, pre.image_size, 3)) * 255
                ).astype(np.uint8)
        results["rss"] = _peak_rss(bundle, "what shape is in the image?", clip, venv / "bin" / "python")
        results["round_trip"] = (_shaped_round_trips(checkpoint, bundle, venv / "bin" / "python", requests)
                                 if checkpoint else {"skipped": "no --checkpoint to serve"})
    finally:
        if fresh:
            shutil.rmtree(venv.parent, ignore_errors=True)
    results["int8_accuracy"] = (b.manifest.get("parity") or {}).get("int8")
    out.mkdir(parents=True, exist_ok=True)
    (out / "device.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def summary(results: dict[str, Any]) -> str:
    """A short plain-text table of ``results``."""
    lines = []
    for label, p in results["presets"].items():
        for t, row in p["encoder"].items():
            parts = [f"{k} {v['p50_ms']:.2f}/{v['p99_ms']:.2f} ms" for k, v in row.items() if isinstance(v, dict)]
            ratio = f"ONNX fp32 / PyTorch {row['onnx_fp32_over_pytorch']:.2f}"
            speed = f", int8 ×{row['int8_speedup_over_fp32']:.2f}" if "int8_speedup_over_fp32" in row else ""
            lines.append(f"{label} {t}: " + ", ".join(parts) + f" (p50/p99); {ratio}{speed}")
        if "bundle_bytes" in p:
            bb = p["bundle_bytes"]
            lines.append(f"{label}: bundle {bb['fp32'] / 1e6:.2f} MB fp32, "
                         f"{(bb['int8'] or 0) / 1e6:.2f} MB int8")
    ins = results["install"]
    lines.append(f"install: device env {ins['device_env_bytes'] / 1e6:.0f} MB, "
                 f"full {ins['full_env_bytes'] / 1e6:.0f} MB (ratio {ins['ratio']:.3f}); "
                 f"device process peak RSS {results['rss']['peak_rss_mb']:.0f} MB")
    h = results["head"]["onnx"]
    lines.append(f"head (ONNX Runtime): {h['p50_ms'] * 1e3:.0f}/{h['p99_ms'] * 1e3:.0f} µs p50/p99")
    rt = results["round_trip"]
    if "skipped" in rt:
        lines.append(f"round trip: skipped ({rt['skipped']})")
    else:
        cells = [f"{k} {v.get('p50_ms', float('nan')):.1f}" for k, v in rt.items()]
        lines.append("round trip p50 ms: " + ", ".join(cells))
    q = results.get("int8_accuracy")
    if q:
        lo, hi = q["accuracy_change_interval_points"]
        lines.append(f"int8 accuracy change {q['accuracy_change_points']:+.2f} pt [{lo:+.2f}, {hi:+.2f}] (export)")
    return "\n".join(lines)
