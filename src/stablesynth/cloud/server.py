"""Running the cloud service: uvicorn with connection limits, one or several processes.

Serving is stateless (checkpoints are read-only), so it scales out as more processes on
one port (``workers``; the kernel spreads connections, each process batches its own
requests) or behind any HTTP load balancer. Each process pins PyTorch to ``torch_threads``
intra-op threads and moves start-up objects out of the garbage collector's way.

The app itself is in :mod:`stablesynth.cloud.app`, batching in
:mod:`stablesynth.cloud.batching`, the served model and its checkpoints in
:mod:`stablesynth.cloud.model`, connection limits in :mod:`stablesynth.cloud.limits`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn

from stablesynth.cloud.app import VERSION_HEADER, create_app
from stablesynth.cloud.limits import GuardedConfig, ServeLimits
from stablesynth.cloud.model import CloudModel, load_cloud_model, save_cloud_model
from stablesynth.cloud.workermetrics import multiprocess_directory

__all__ = ["VERSION_HEADER", "CloudModel", "ServeLimits", "ServeSpec", "create_app", "load_cloud_model",
           "load_models", "save_cloud_model", "serve", "serve_checkpoints"]

#: Environment variable that hands a :class:`ServeSpec` to worker processes.
SPEC_ENV = "STABLESYNTH_SERVE_SPEC"


@dataclass
class ServeSpec:
    """What each serving process loads and how it batches (JSON-serialisable)."""

    checkpoints: list[str]
    model_id: str | None = None
    device: str | None = None
    token: str | None = None
    max_batch: int = 64
    max_wait_ms: float = 0.0
    inline_ms: float = 1.0
    torch_threads: int = 1
    limits: dict[str, Any] = field(default_factory=dict)
    encode_threads: int = 2
    #: Seconds a SIGTERM'd process may take to drain (stablesynth.cloud.drain); 0 exits at once.
    drain_timeout: float = 0.0
    #: Serve /docs and /openapi.json; put /metrics behind the token.
    docs: bool = True
    protect_metrics: bool = False
    #: PEM certificate chain and private key: serve HTTPS (both or neither).
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


def load_models(checkpoints: Sequence[str | Path], model_id: str | None = None,
                device: torch.device | str | None = None) -> dict[str, CloudModel]:
    """Load method checkpoints (on the CPU, then moved to ``device``), keyed by model id."""
    if model_id and len(checkpoints) > 1:
        raise ValueError("--model-id needs exactly one --checkpoint")
    models: dict[str, CloudModel] = {}
    for ckpt in checkpoints:
        model = load_cloud_model(ckpt, model_id=model_id, device=device)
        if model.model_id in models:
            raise ValueError(f"two checkpoints claim model id {model.model_id!r}")
        models[model.model_id] = model
    return models


def _raise_fd_limit() -> None:
    """Allow as many open connections as the hard limit permits (limit_concurrency sheds beyond)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: glibc's mallopt parameters, and the values a serving process uses.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def _keep_freed_memory() -> bool:
    """Let glibc reuse freed reply buffers instead of handing them back to the kernel.

    A Θ_d reply is 582 KB at K = 1501. By default glibc serves a block that large with a fresh
    ``mmap`` (or shrinks its heap once the block is freed), so every reply starts with ~140
    page faults: measured 133 per fp32 reply in the server, several microseconds each on a
    busy virtual machine, i.e. more than computing the reply. Blocks under 32 MiB now come
    from the heap, and up to 256 MiB of freed heap stays in the process for the next batch.
    Returns whether the allocator took the settings (not glibc: nothing changes).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _app_kwargs(spec: ServeSpec) -> dict[str, Any]:
    return {"token": spec.token, "max_batch": spec.max_batch, "max_wait_ms": spec.max_wait_ms,
            "inline_ms": spec.inline_ms, "freeze_gc": True, "encode_threads": spec.encode_threads,
            "drain_timeout": spec.drain_timeout, "docs": spec.docs, "protect_metrics": spec.protect_metrics}


def _tls_kwargs(spec: ServeSpec | None) -> dict[str, Any]:
    if spec is None or spec.ssl_certfile is None:
        return {}
    return {"ssl_certfile": spec.ssl_certfile, "ssl_keyfile": spec.ssl_keyfile}


def app_from_environment() -> Any:
    """App factory of a worker process: loads the checkpoints named in :data:`SPEC_ENV`."""
    spec = ServeSpec(**json.loads(os.environ[SPEC_ENV]))
    if spec.torch_threads >= 1:
        torch.set_num_threads(spec.torch_threads)
    _keep_freed_memory()
    return create_app(load_models(spec.checkpoints, spec.model_id, spec.device), **_app_kwargs(spec))


def serve(models: Mapping[str, CloudModel], host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, max_batch: int = 64, max_wait_ms: float = 0.0, inline_ms: float = 1.0,
          torch_threads: int = 1, limits: ServeLimits | None = None, encode_threads: int = 2,
          drain_timeout: float = 0.0, spec: ServeSpec | None = None) -> None:
    """Run the app for already loaded ``models`` with uvicorn in the foreground (one process).

    ``torch_threads`` sets PyTorch's intra-op threads for this process. One is the right
    number for per-upload calls of well under a millisecond: on a busy machine a second
    intra-op thread that has to be woken up costs far more than it saves (measured: 30 ms
    instead of 0.2 ms per fp32 adaptation at K = 1501 on two shared cores). Scale out
    with more processes instead (:func:`serve_checkpoints`). ``spec`` adds its app options
    (docs, protected metrics) and TLS files.
    """
    if torch_threads >= 1:
        torch.set_num_threads(torch_threads)
    _raise_fd_limit()
    _keep_freed_memory()
    options = {"docs": spec.docs, "protect_metrics": spec.protect_metrics} if spec is not None else {}
    app = create_app(models, token=token, max_batch=max_batch, max_wait_ms=max_wait_ms, inline_ms=inline_ms,
                     freeze_gc=True, encode_threads=encode_threads, drain_timeout=drain_timeout, **options)
    config = GuardedConfig(app, limits=limits, host=host, port=port, log_level="warning", access_log=False,
                           **_drain_config(drain_timeout), **_tls_kwargs(spec))
    uvicorn.Server(config).run()


def serve_checkpoints(spec: ServeSpec, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                      models: Mapping[str, CloudModel] | None = None) -> None:
    """Serve ``spec`` in ``workers`` processes on one port (``models``: already loaded, for one worker)."""
    limits = ServeLimits(**spec.limits)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers == 1:
        loaded = models if models is not None else load_models(spec.checkpoints, spec.model_id, spec.device)
        serve(loaded, host, port, spec.token, spec.max_batch, spec.max_wait_ms, spec.inline_ms,
              spec.torch_threads, limits, spec.encode_threads, spec.drain_timeout, spec)
        return
    from uvicorn.supervisors import Multiprocess

    _raise_fd_limit()
    os.environ[SPEC_ENV] = json.dumps(asdict(spec))  # inherited by the workers, not on any command line
    config = GuardedConfig("stablesynth.cloud.server:app_from_environment", limits=limits, factory=True,
                           host=host, port=port, workers=workers, log_level="warning", access_log=False,
                           **_drain_config(spec.drain_timeout), **_tls_kwargs(spec))
    sock = config.bind_socket()
    with multiprocess_directory():  # before the workers start: they read it at import
        Multiprocess(config, sockets=[sock]).run()


def _drain_config(drain_timeout: float) -> dict[str, Any]:
    # After the drain, uvicorn waits as long again for requests that arrived at its very end.
    return {"timeout_graceful_shutdown": drain_timeout} if drain_timeout > 0 else {}
