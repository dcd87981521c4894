"""The device's exchange with the cloud: upload one frame feature, get Θ_d, never be left without a model.

:class:`AdaptClient` uploads one 192-float frame feature, verifies the reply (protocol
checksum, model id and version, encoding, shapes, finiteness) and on success keeps the
parameters as the last good ones on disk (temp file + ``os.replace``). When the server is
down, slow, refuses, answers garbage or serves another version, it falls back to those cached
parameters, else to the bundle's global ones, and says which (``AdaptResult.source``) and why
(``AdaptResult.error``). ``factors`` and ``driver`` replies are expanded into Θ_d on the device
with the bundle's generator weights (:mod:`stablesynth_device.generators`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from stablesynth_device.bundle import Bundle, BundleError, params_problem
from stablesynth_device.generators import GeneratorDecoder
from stablesynth_device.tensors import TensorFileError, read_tensors, write_tensors
from stablesynth_device.wire import protocol
from stablesynth_device.wire.protocol import ADAPT_PATH, ENCODINGS, MEDIA_TYPE, PARAM_ENCODINGS, VERSION_HEADER
from stablesynth_device.wire.uploads import encode_upload

Source = Literal["server", "cache", "global"]
Params = dict[str, np.ndarray]


@dataclass
class AdaptResult:
    """Θ_d for the device and where it came from."""

    params: Params
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


def check_server_url(url: str) -> str:
    """``url`` without a trailing slash, or ValueError naming what is wrong with it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"server URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"server URL {url!r}: expected http(s)://HOST[:PORT]")
    return url.rstrip("/")


class AdaptClient:
    """Upload one frame feature, get Θ_d, fall back to cached or global parameters on any failure.

    ``timeout`` is the deadline of the whole exchange, retries included: :meth:`adapt`
    returns by then whatever the server does (a server that drips bytes is abandoned at the
    deadline). At most ``1 + retries`` attempts are made, only for failures that may pass
    (connection errors, timeouts, 5xx, corrupted frames). A version mismatch or a 4xx is
    final. A reply larger than ``max_reply_bytes`` is refused while it streams in. An
    ``https`` server must present a certificate the system trusts, or one signed by the CA
    certificates in ``ca_file`` (PEM); a server it cannot verify is refused like one that is down.
    """

    def __init__(self, base_url: str | None, bundle: Bundle | str | Path, encoding: str = "fp32", timeout: float = 2.0,
                 retries: int = 2, token: str | None = None, cache_dir: str | Path | None = None,
                 backoff_s: float = 0.05, max_reply_bytes: int | None = None,
                 ca_file: str | Path | None = None) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        if retries < 0 or not timeout > 0:
            raise ValueError("retries must be >= 0 and timeout > 0")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.model_id = self.bundle.model_id
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
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"--ca-file {ca_file}: not a PEM file of CA certificates ({exc})") from None
        # No server (offline): every adaptation is the fallback.
        self.http = (httpx.Client(base_url=check_server_url(base_url), timeout=httpx.Timeout(timeout), headers=headers,
                                  verify=verify) if base_url is not None else None)
        self._decoder: GeneratorDecoder | None = None

    # -- lifecycle
    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.http is not None:
            self.http.close()

    def __enter__(self) -> AdaptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def decoder(self) -> GeneratorDecoder:
        """The generator that expands ``factors``/``driver`` replies (built on first use)."""
        if self._decoder is None:
            self._decoder = GeneratorDecoder(self.bundle.generator_kind, self.bundle.generator_weights(),
                                             self.bundle.num_classes, self.bundle.hidden_dim)
        return self._decoder

    # -- adaptation
    def adapt(self, feature: np.ndarray) -> AdaptResult:
        """Θ_d for this upload: from the server if it can be trusted, else cache, else global."""
        body = encode_upload(feature)
        t0 = time.perf_counter()
        if self.http is None:
            params, source, why = self.fallback()
            return AdaptResult(params, source, "offline" + (f"; {why}" if why else ""), 0,
                               (time.perf_counter() - t0) * 1e3, 0)
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
                return AdaptResult(params, "server", None, bytes_down, (time.perf_counter() - t0) * 1e3, attempts)
            except _RetryableError as exc:
                error = str(exc)
                if attempt < self.retries:
                    time.sleep(max(0.0, min(self.backoff_s * (2**attempt), deadline - time.perf_counter())))
            except _FinalError as exc:
                error = str(exc)
                break
        params, source, why = self.fallback()
        if why:
            error = f"{error}; {why}"
        return AdaptResult(params, source, error, bytes_down, (time.perf_counter() - t0) * 1e3, attempts)

    def _attempt_by(self, body: bytes, deadline: float) -> tuple[Params, int]:
        """One attempt that returns (or raises) by ``deadline`` whatever the server does."""
        cancel = threading.Event()
        fut = self._pool.submit(self._attempt, body, deadline, cancel)
        try:
            return fut.result(timeout=max(0.0, deadline - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            cancel.set()  # the exchange stops at its next chunk or read timeout
            raise _RetryableError(f"timeout: no complete reply within the {self.timeout:g} s deadline") from None

    def _read(self, body: bytes, deadline: float, cancel: threading.Event) -> tuple[int, bytes]:
        """Status and body (capped at ``max_reply_bytes``) of one exchange."""
        assert self.http is not None
        phase = httpx.Timeout(max(deadline - time.perf_counter(), 1e-3))
        try:
            with self.http.stream("POST", ADAPT_PATH.format(model=self.model_id), content=body,
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
                return resp.status_code, b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise _RetryableError(f"timeout: {type(exc).__name__}") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise _RetryableError(f"server unreachable: {type(exc).__name__}: {exc}") from None

    def _attempt(self, body: bytes, deadline: float, cancel: threading.Event) -> tuple[Params, int]:
        status, data = self._read(body, deadline, cancel)
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
        except protocol.ProtocolError as exc:
            raise _RetryableError(f"{type(exc).__name__}: {exc}") from None
        if header.encoding != self.encoding:
            raise _FinalError(f"asked for {self.encoding}, got {header.encoding}")
        try:
            params = self.expand(tensors, header.encoding)
        except (KeyError, ValueError, BundleError) as exc:
            raise _FinalError(f"payload does not fit the device's generator: {exc}") from None
        why = params_problem(params, self.bundle.num_classes, self.bundle.hidden_dim)
        if why is not None:
            raise _FinalError(f"bad parameters: {why}")
        return params, len(data)

    def expand(self, tensors: dict[str, np.ndarray], encoding: str) -> Params:
        """Θ_d from a decoded reply: as is for fp32/fp16/int8, rebuilt by the generator otherwise."""
        if encoding in PARAM_ENCODINGS:
            return {"weight": tensors["weight"], "bias": tensors["bias"]}
        if encoding == "factors":
            return self.decoder.theta(tensors)
        if set(tensors) != {"driver"}:
            raise ValueError(f"a driver reply holds {sorted(tensors)}, expected ['driver']")
        return self.decoder.theta_from_driver(tensors["driver"])

    # -- cache
    def _save_cache(self, params: Params) -> None:
        # A full disk must not turn a good adaptation into a failure.
        with contextlib.suppress(OSError):
            write_tensors(self.cache_path, params, {"model_id": self.model_id,
                                                    "model_version": self.bundle.model_version})

    def load_cache(self) -> tuple[Params | None, str | None]:
        """The last good parameters if present and for this model version, else (None, why)."""
        if not self.cache_path.is_file():
            return None, "no cached parameters"
        try:
            params, meta = read_tensors(self.cache_path)
        except TensorFileError as exc:
            return None, f"cache unreadable: {exc}"
        if meta.get("model_id") != self.model_id or meta.get("model_version") != self.bundle.model_version:
            return None, f"cache is for {meta.get('model_id')}@{meta.get('model_version')}"
        why = params_problem(params, self.bundle.num_classes, self.bundle.hidden_dim)
        return (None, f"cache unusable: {why}") if why else (params, None)

    def fallback(self) -> tuple[Params, Source, str | None]:
        """The cached parameters if usable, else the bundle's global ones (and why not the cache)."""
        cached, why = self.load_cache()
        if cached is not None:
            return cached, "cache", None
        return {k: v.copy() for k, v in self.bundle.global_params.items()}, "global", why
