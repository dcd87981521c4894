"""The device side: its bundle, and a client that never leaves the device without a model.

A *device bundle* is what gets installed on a device, exported once from a
checkpoint (:func:`export_device_bundle`)::

    manifest.json          model id/version, K, method + config, encodings, SHA-256 of every file
    device.onnx            static MLP + dynamic layer (Θ_d as graph inputs), see runtime.py
    static.safetensors     the static head's weights (the same ones baked into device.onnx)
    global.safetensors     global Θ_d (weight [K, 96], bias [K]): the fallback of last resort
    generator.safetensors  the generator's weights, for the ``factors``/``driver`` encodings

:class:`DeviceClient` uploads one frame feature, verifies the reply (protocol
checksum, model id and version, shapes, finiteness) and on success keeps the
parameters as the last good ones on disk (temp file + ``os.replace``). When the
server is down, slow, answers garbage or serves another version, it falls back
to those cached parameters, else to the bundle's global ones, and says which
(``AdaptResult.source``) and why (``AdaptResult.error``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from stablesynth.files import atomic_write_bytes, atomic_write_text, sha256_file
from stablesynth.methods import build_method
from stablesynth.serving import protocol
from stablesynth.serving.app import VERSION_HEADER
from stablesynth.serving.model import CloudModel
from stablesynth.serving.protocol import ENCODINGS, MEDIA_TYPE, PARAM_ENCODINGS, ProtocolError
from stablesynth.serving.runtime import DeviceRuntime, export_device_onnx

BUNDLE_FORMAT = "stablesynth-device-bundle"
BUNDLE_VERSION = 1
Source = Literal["server", "cache", "global"]


class BundleError(ValueError):
    """A device bundle is missing, corrupt or of an unknown format."""


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write safetensors so that a crash leaves either the old file or the new one, never half."""
    data = save({k: v.detach().contiguous().float().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data, fsync=True)


def global_params(cloud: CloudModel) -> dict[str, torch.Tensor]:
    """Θ_d the device uses when it has nothing better.

    The generator's shared base (W0, b0) when it has one (``lowrank``/``film``: the
    parameters every adaptation is an offset from); otherwise its output at the zero driver.
    """
    gen = getattr(cloud.method, "generator", None)
    if gen is None:
        raise BundleError(f"method {cloud.method_name!r} has no generator; nothing to export")
    shared = gen.shared()
    if {"weight", "bias"} <= set(shared):
        return {"weight": shared["weight"].detach().clone(), "bias": shared["bias"].detach().clone()}
    with torch.inference_mode():
        out = gen(torch.zeros(1, gen.driver_dim))
    return {"weight": out["weight"][0].clone(), "bias": out["bias"][0].clone()}


def export_device_bundle(cloud: CloudModel, out_dir: str | Path) -> Path:
    """Write the device bundle of ``cloud`` to ``out_dir`` (atomically: temp dir, then rename)."""
    out = Path(out_dir)
    static = getattr(cloud.method, "static", None)
    if static is None:
        raise BundleError(f"method {cloud.method_name!r} has no static head")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise BundleError(f"{out} exists and is not a device bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = {"model_id": cloud.model_id, "model_version": cloud.version}
        was_training = static.training
        static.eval()
        export_device_onnx(static, tmp / "device.onnx", cloud.num_classes)
        static.train(was_training)
        _atomic_save(static.state_dict(), tmp / "static.safetensors", meta)
        _atomic_save(global_params(cloud), tmp / "global.safetensors", meta)
        _atomic_save(cloud.method.generator.state_dict(), tmp / "generator.safetensors", meta)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": BUNDLE_FORMAT, "bundle_version": BUNDLE_VERSION,
            "model_id": cloud.model_id, "model_version": cloud.version, "num_classes": cloud.num_classes,
            "method": cloud.method_name, "method_config": cloud.method_config,
            "encodings": list(cloud.encodings),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class DeviceBundle:
    path: Path
    manifest: dict[str, Any]
    global_params: dict[str, torch.Tensor]

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @classmethod
    def load(cls, path: str | Path) -> DeviceBundle:
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise BundleError(f"{path} is not a device bundle (no manifest.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}/manifest.json does not parse: {exc}") from None
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("bundle_version") != BUNDLE_VERSION:
            raise BundleError(f"{path}: not a version-{BUNDLE_VERSION} {BUNDLE_FORMAT}")
        for name, digest in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file() or sha256_file(file) != digest:
                raise BundleError(f"{path}: {name} is missing or corrupt (SHA-256 mismatch)")
        try:
            glob = load_file(str(path / "global.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"{path}: global.safetensors does not load: {exc}") from None
        bundle = cls(path, manifest, glob)
        if _check_params(glob, bundle.num_classes) is not None:
            raise BundleError(f"{path}: global parameters do not fit K={bundle.num_classes}")
        return bundle

    def generator(self) -> torch.nn.Module:
        """The generator, rebuilt from the method's config and loaded with the bundle's weights."""
        method = build_method(self.manifest["method"], self.num_classes, self.manifest.get("method_config") or {})
        gen = method.generator
        gen.load_state_dict(load_file(str(self.path / "generator.safetensors")), strict=True)
        return gen.eval()


def _check_params(params: Mapping[str, torch.Tensor], num_classes: int, hidden: int = 96) -> str | None:
    """Why ``params`` is not a usable Θ_d for K=num_classes, or None."""
    w, b = params.get("weight"), params.get("bias")
    if w is None or b is None:
        return f"parameters lack weight/bias (have {sorted(params)})"
    if tuple(w.shape) != (num_classes, hidden) or tuple(b.shape) != (num_classes,):
        return f"shapes {tuple(w.shape)}, {tuple(b.shape)} do not fit K={num_classes}"
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        return "parameters hold NaN or Inf"
    return None


@dataclass
class AdaptResult:
    """Θ_d for the device and where it came from."""

    params: dict[str, torch.Tensor]
    source: Source
    error: str | None = None
    bytes_down: int = 0
    latency_ms: float = 0.0
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _RetryableError(Exception):
    """A failure that another attempt may not meet (network, timeout, 5xx, corrupted bytes)."""


class _FinalError(Exception):
    """A failure that retrying cannot fix (4xx, other model version, payload that does not fit)."""


def default_max_reply_bytes(num_classes: int) -> int:
    """Largest reply the device accepts for K classes: twice fp32 Θ_d (97·K floats) plus 1 MiB."""
    return 2 * 4 * 97 * num_classes + (1 << 20)


class DeviceClient:
    """Upload one frame feature, get Θ_d, fall back to cached or global parameters on any failure.

    ``timeout`` is the deadline of the whole exchange, retries included: :meth:`adapt`
    returns by then whatever the server does (a server that drips bytes is abandoned at the
    deadline). At most ``1 + retries`` attempts are made, only for failures that may pass
    (connection errors, timeouts, 5xx, corrupted frames). A version mismatch or a 4xx is
    final. A reply larger than ``max_reply_bytes`` is refused while it streams in.
    """

    def __init__(self, base_url: str, bundle_dir: str | Path, model_id: str | None = None,
                 encoding: str = "fp32", timeout: float = 2.0, retries: int = 2, token: str | None = None,
                 cache_dir: str | Path | None = None, backoff_s: float = 0.05,
                 max_reply_bytes: int | None = None) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        if retries < 0 or not timeout > 0:
            raise ValueError("retries must be >= 0 and timeout > 0")
        self.bundle = DeviceBundle.load(bundle_dir)
        self.model_id = model_id or self.bundle.model_id
        if self.model_id != self.bundle.model_id:
            raise BundleError(f"bundle is for model {self.bundle.model_id!r}, not {self.model_id!r}")
        self.encoding = encoding
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout = timeout
        self.max_reply_bytes = max_reply_bytes or default_max_reply_bytes(self.bundle.num_classes)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapt")
        self.cache_path = Path(cache_dir or self.bundle.path / "cache") / "last_good.safetensors"
        headers = {"Content-Type": "application/octet-stream", "Accept": MEDIA_TYPE,
                   VERSION_HEADER: self.bundle.model_version}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout),
                                 headers=headers)
        self._generator: torch.nn.Module | None = None
        self._runtime: DeviceRuntime | None = None

    # -- lifecycle
    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def runtime(self) -> DeviceRuntime:
        if self._runtime is None:
            self._runtime = DeviceRuntime(self.bundle.path / "device.onnx")
        return self._runtime

    # -- adaptation
    def adapt(self, feature: torch.Tensor | np.ndarray) -> AdaptResult:
        """Θ_d for this upload: from the server if it can be trusted, else cache, else global."""
        body = protocol.encode_upload(feature)
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        error: str | None = None
        attempts = 0
        bytes_down = 0
        for attempt in range(self.retries + 1):
            if time.perf_counter() >= deadline:
                break
            attempts = attempt + 1
            try:
                params, n = self._attempt_by(body, deadline)
                bytes_down += n
                self._save_cache(params)
                return AdaptResult(params, "server", None, bytes_down, (time.perf_counter() - t0) * 1e3,
                                   attempts)
            except _RetryableError as exc:
                error = str(exc)
                if attempt < self.retries:
                    time.sleep(max(0.0, min(self.backoff_s * (2**attempt), deadline - time.perf_counter())))
            except _FinalError as exc:
                error = str(exc)
                break
        params, source, why = self._fallback()
        if why:
            error = f"{error}; {why}"
        return AdaptResult(params, source, error, bytes_down, (time.perf_counter() - t0) * 1e3, attempts)

    def predict(self, f_g: torch.Tensor | np.ndarray,
                feature: torch.Tensor | np.ndarray) -> tuple[np.ndarray, AdaptResult]:
        """Adapt from ``feature`` (the uploaded frame), then predict logits for the clip feature ``f_g``."""
        result = self.adapt(feature)
        return self.runtime.predict(f_g, result.params["weight"], result.params["bias"]), result

    def _attempt_by(self, body: bytes, deadline: float) -> tuple[dict[str, torch.Tensor], int]:
        """One attempt that returns (or raises) by ``deadline`` whatever the server does."""
        cancel = threading.Event()
        fut = self._pool.submit(self._attempt, body, deadline, cancel)
        try:
            return fut.result(timeout=max(0.0, deadline - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            cancel.set()  # the exchange stops at its next chunk or read timeout
            raise _RetryableError(f"timeout: no complete reply within the {self.timeout:g} s deadline") from None

    def _read(self, body: bytes, deadline: float, cancel: threading.Event) -> tuple[int, bytes, str]:
        """Status, body (capped at ``max_reply_bytes``) and content type of one exchange."""
        phase = httpx.Timeout(max(deadline - time.perf_counter(), 1e-3))
        try:
            with self.http.stream("POST", f"/v1/models/{self.model_id}/adapt", content=body,
                                  params={"encoding": self.encoding}, timeout=phase) as resp:
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_reply_bytes:
                    raise _FinalError(f"reply of {declared} bytes exceeds the cap of {self.max_reply_bytes}")
                chunks, size = [], 0
                for chunk in resp.iter_raw():
                    size += len(chunk)
                    if size > self.max_reply_bytes:
                        raise _FinalError(f"reply exceeds the cap of {self.max_reply_bytes} bytes")
                    if cancel.is_set():
                        raise _RetryableError("timeout: deadline passed while reading")
                    chunks.append(chunk)
                return resp.status_code, b"".join(chunks), resp.headers.get("content-type", "")
        except httpx.TimeoutException as exc:
            raise _RetryableError(f"timeout: {type(exc).__name__}") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise _RetryableError(f"server unreachable: {type(exc).__name__}: {exc}") from None

    def _attempt(self, body: bytes, deadline: float,
                 cancel: threading.Event) -> tuple[dict[str, torch.Tensor], int]:
        status, data, _ = self._read(body, deadline, cancel)
        if status >= 500:
            raise _RetryableError(f"server error {status}")
        if status != 200:
            try:
                detail = json.loads(data)
                msg = f"{detail.get('error')}: {detail.get('detail')}"
            except (ValueError, AttributeError, RecursionError):
                msg = data[:200].decode("utf-8", "replace")
            if status == 409:
                msg += (f"; this bundle is {self.model_id}@{self.bundle.model_version}: refusing the "
                        "server's parameters")
            raise _FinalError(f"HTTP {status} {msg}")
        try:
            tensors, header = protocol.decode(data, self.model_id, self.bundle.model_version)
        except (protocol.ModelMismatch, protocol.UnsupportedVersion) as exc:
            raise _FinalError(f"{type(exc).__name__}: {exc}; this bundle is "
                              f"{self.model_id}@{self.bundle.model_version}: refusing the server's "
                              "parameters") from None
        except ProtocolError as exc:
            raise _RetryableError(f"{type(exc).__name__}: {exc}") from None
        if header.encoding != self.encoding:
            raise _FinalError(f"asked for {self.encoding}, got {header.encoding}")
        try:
            params = self._expand(tensors, header.encoding)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise _FinalError(f"payload does not fit the device's generator: {exc}") from None
        why = _check_params(params, self.bundle.num_classes)
        if why is not None:
            raise _FinalError(f"bad parameters: {why}")
        return params, len(data)

    def _expand(self, tensors: dict[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
        if encoding in PARAM_ENCODINGS:
            return {"weight": tensors["weight"], "bias": tensors["bias"]}
        if self._generator is None:
            self._generator = self.bundle.generator()
        with torch.inference_mode():
            if encoding == "factors":
                out = self._generator.expand({k: v.unsqueeze(0) for k, v in tensors.items()})
            else:
                out = self._generator(tensors["driver"].unsqueeze(0))
        return {"weight": out["weight"][0].clone(), "bias": out["bias"][0].clone()}

    # -- cache
    def _save_cache(self, params: Mapping[str, torch.Tensor]) -> None:
        # A full disk must not turn a good adaptation into a failure.
        with contextlib.suppress(OSError):
            _atomic_save(params, self.cache_path, {"model_id": self.model_id,
                                                   "model_version": self.bundle.model_version})

    def load_cache(self) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """The last good parameters if present and for this model version, else (None, why)."""
        if not self.cache_path.is_file():
            return None, "no cached parameters"
        try:
            from safetensors import safe_open

            with safe_open(str(self.cache_path), "pt") as f:
                meta = f.metadata() or {}
                params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except (SafetensorError, OSError, ValueError) as exc:
            return None, f"cache unreadable: {exc}"
        if meta.get("model_id") != self.model_id or meta.get("model_version") != self.bundle.model_version:
            return None, f"cache is for {meta.get('model_id')}@{meta.get('model_version')}"
        why = _check_params(params, self.bundle.num_classes)
        return (None, f"cache unusable: {why}") if why else (params, None)

    def _fallback(self) -> tuple[dict[str, torch.Tensor], Source, str | None]:
        cached, why = self.load_cache()
        if cached is not None:
            return cached, "cache", None
        glob = {k: v.clone() for k, v in self.bundle.global_params.items()}
        return glob, "global", why
