"""The cloud service: FastAPI app with dynamic batching of adapt requests.

Serving is stateless (the checkpoint is read-only), so it scales out as more
processes behind any HTTP load balancer; inside one process, concurrent
``adapt`` requests are gathered into one batched call of the method (up to
``max_batch`` requests or ``max_wait_ms`` after the first), run in a worker
thread so the event loop keeps accepting requests.

Endpoints (all replies to errors are JSON ``{"error": code, "detail": text}``):

- ``POST /v1/models/{model}/adapt?encoding=fp32|fp16|int8|factors|driver``:
  body = 768 B little-endian float32 (``application/octet-stream``) or
  ``{"feature": [192 numbers]}``; reply = one protocol frame
  (``application/vnd.stablesynth``). ``X-Model-Version`` in the request pins
  the version (409 on mismatch).
- ``POST /v1/noop``: parses the upload like ``adapt`` and returns it, no model call.
- ``GET /v1/models``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel

from stablesynth.methods.base import METHODS, Method
from stablesynth.serving import protocol
from stablesynth.serving.protocol import ENCODINGS, MEDIA_TYPE, PARAM_ENCODINGS

VERSION_HEADER = "X-Model-Version"
DEFAULT_MAX_BODY = 64 * 1024


@dataclass
class CloudModel:
    """A method served under ``model_id``/``version``; ``num_classes`` is K of its Θ_d."""

    method: Method
    model_id: str
    version: str
    num_classes: int
    #: How to rebuild the method elsewhere (device bundle): registry name, config dict.
    method_name: str = ""
    method_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method.eval()
        if not self.method_name:
            self.method_name = getattr(self.method, "name", type(self.method).__name__)

    @property
    def encodings(self) -> tuple[str, ...]:
        if getattr(self.method, "generator", None) is None:
            return PARAM_ENCODINGS
        return ENCODINGS

    def compute(self, uploads: torch.Tensor, encoding: str) -> list[dict[str, torch.Tensor]]:
        """What to send for each upload in ``encoding`` (one method call for the whole batch)."""
        with torch.inference_mode():
            if encoding in PARAM_ENCODINGS:
                out = self.method.adapt(uploads)
            elif encoding == "factors":
                out = self.method.generator.factors(self.method.driver(uploads))
            elif encoding == "driver":
                out = {"driver": self.method.driver(uploads)}
            else:
                raise ValueError(f"unknown encoding {encoding!r}")
        return [{k: v[i] for k, v in out.items()} for i in range(uploads.shape[0])]

    def describe(self) -> dict[str, Any]:
        gen = getattr(self.method, "generator", None)
        return {"id": self.model_id, "version": self.version, "num_classes": self.num_classes,
                "method": self.method_name, "generator": type(gen).__name__ if gen is not None else None,
                "encodings": list(self.encodings)}


# ----------------------------------------------------------------------------- checkpoints


def build_method(method_name: str, config: Mapping[str, Any], num_classes: int) -> Method:
    """Construct a registered method from its config dict (the checkpoint manifest's)."""
    import stablesynth.methods  # noqa: F401  (registers the methods)

    cls = METHODS.get(method_name)
    try:
        from stablesynth.methods.config import MethodConfig
    except ModuleNotFoundError:
        raise RuntimeError("stablesynth.methods.config is not available in this build") from None
    cfg = MethodConfig.from_dict(dict(config))
    return cls(cfg, num_classes)


CHECKPOINT_KIND = "method"


def save_cloud_model(directory: str | Path, method: Method, model_id: str, version: str,
                     method_config: Mapping[str, Any] | None = None,
                     num_classes: int | None = None) -> Path:
    """Write a servable checkpoint of ``method``: its state dict plus how to rebuild it.

    ``method_config``/``num_classes`` default to the method's ``cfg``/``num_classes`` attributes.
    """
    from stablesynth.training import checkpoint

    cfg_obj = getattr(method, "cfg", None)
    if method_config is None:
        if cfg_obj is None:
            raise ValueError("pass method_config: the method has no cfg attribute")
        method_config = cfg_obj.to_dict()
    k = num_classes if num_classes is not None else getattr(method, "num_classes", None)
    if k is None:
        raise ValueError("pass num_classes: the method has no num_classes attribute")
    manifest = {"method": method.name, "config": dict(method_config), "num_classes": int(k),
                "model_id": str(model_id), "model_version": str(version)}
    return checkpoint.save_module(directory, method, manifest, kind=CHECKPOINT_KIND)


def load_cloud_model(checkpoint_dir: str | Path, model_id: str | None = None,
                     version: str | None = None) -> CloudModel:
    """Build the method named in the checkpoint manifest and load its verified weights.

    The model id defaults to the manifest's ``model_id`` (else the directory name) and the
    version to its ``model_version`` (else the first 12 hex digits of the weights' SHA-256,
    so a retrained checkpoint is a new version without anyone having to say so).
    """
    from stablesynth.training import checkpoint

    directory = Path(checkpoint_dir)
    manifest = checkpoint.read_manifest(directory)
    for key in ("method", "num_classes"):
        if key not in manifest:
            raise checkpoint.CheckpointError(f"checkpoint {directory} is not a method checkpoint: no {key!r}")
    method_name, k = str(manifest["method"]), int(manifest["num_classes"])
    cfg = dict(manifest.get("config") or {})
    method = build_method(method_name, cfg, k)
    checkpoint.load_module_state(directory, method)
    mid = model_id or manifest.get("model_id") or directory.name
    ver = version or manifest.get("model_version") or str(manifest["sha256"])[:12]
    return CloudModel(method, str(mid), str(ver), k, method_name, cfg)


# ----------------------------------------------------------------------------- batching


@dataclass
class _Pending:
    upload: torch.Tensor
    encoding: str
    future: asyncio.Future[bytes]


class _Batcher:
    """Gathers concurrent requests of one model into batched ``compute`` calls."""

    def __init__(self, model: CloudModel, max_batch: int, max_wait_ms: float, executor: ThreadPoolExecutor,
                 batch_hist: Histogram) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.executor = executor
        self.batch_hist = batch_hist
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, upload: torch.Tensor, encoding: str) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(upload, encoding, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                # Take whatever is already queued without waiting, then wait out the window.
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            self.batch_hist.observe(len(live))
            try:
                frames = await loop.run_in_executor(self.executor, self._work, live)
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, frame in zip(live, frames):
                if not p.future.done():
                    p.future.set_result(frame)

    def _work(self, batch: list[_Pending]) -> list[bytes]:
        out: list[bytes] = [b""] * len(batch)
        by_encoding: dict[str, list[int]] = {}
        for i, p in enumerate(batch):
            by_encoding.setdefault(p.encoding, []).append(i)
        for encoding, idx in by_encoding.items():
            uploads = torch.stack([batch[i].upload for i in idx])
            per_sample = self.model.compute(uploads, encoding)
            for i, tensors in zip(idx, per_sample):
                out[i] = protocol.encode(tensors, encoding, self.model.model_id, self.model.version)
        return out


# ----------------------------------------------------------------------------- app


class ErrorBody(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary",
                       "description": "192 little-endian float32 values (768 bytes)"}},
        "application/json": {
            "schema": {"type": "object", "required": ["feature"],
                       "properties": {"feature": {"type": "array", "items": {"type": "number"},
                                                  "minItems": 192, "maxItems": 192}}}},
    },
}
_ERR = {"model": ErrorBody}
_ADAPT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "One protocol frame (see stablesynth.serving.protocol)",
          "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    401: {**_ERR, "description": "Missing or wrong bearer token"},
    404: {**_ERR, "description": "Unknown model"},
    409: {**_ERR, "description": f"{VERSION_HEADER} does not match the served version"},
    413: {**_ERR, "description": "Body too large"},
    415: {**_ERR, "description": "Unsupported Content-Type"},
    422: {**_ERR, "description": "Wrong size, NaN/Inf, bad JSON or unsupported encoding"},
}


def _negotiate(request: Request, model: CloudModel) -> str:
    encoding = request.query_params.get("encoding")
    if encoding is None:
        # Accept: application/vnd.stablesynth; encoding=fp16
        for part in request.headers.get("accept", "").split(","):
            for param in part.split(";")[1:]:
                key, _, value = param.strip().partition("=")
                if key.strip().lower() == "encoding":
                    encoding = value.strip().strip('"')
                    break
            if encoding:
                break
    encoding = encoding or "fp32"
    if encoding not in model.encodings:
        raise ApiError(422, "unsupported_encoding",
                       f"encoding {encoding!r}; model {model.model_id!r} offers {', '.join(model.encodings)}")
    return encoding


def create_app(models: Mapping[str, CloudModel], token: str | None = None, max_batch: int = 64,
               max_wait_ms: float = 2.0, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The ASGI app serving ``models`` (keyed by model id)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    registry = CollectorRegistry()
    requests_total = Counter("stablesynth_requests", "HTTP requests", ["endpoint", "status"],
                             registry=registry)
    latency = Histogram("stablesynth_request_latency_seconds", "Request latency", ["endpoint"],
                        registry=registry,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    batch_sizes = Histogram("stablesynth_batch_size", "Uploads per batched adapt call", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    errors_total = Counter("stablesynth_errors", "Error replies", ["code"], registry=registry)
    bytes_out = Counter("stablesynth_reply_bytes", "Bytes of adapt replies", ["encoding"], registry=registry)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapt")
    batchers = {mid: _Batcher(m, max_batch, max_wait_ms, executor, batch_sizes) for mid, m in models.items()}
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for b in batchers.values():
            b.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for b in batchers.values():
                await b.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="stablesynth cloud", version=str(protocol.PROTOCOL_VERSION), lifespan=lifespan,
                  description=__doc__)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        errors_total.labels(exc.code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status,
                            headers=headers)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        requests_total.labels(endpoint, str(response.status_code)).inc()
        return response

    def check_auth(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")

    async def read_upload(request: Request) -> torch.Tensor:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, "too_large", f"body of {declared} bytes exceeds {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, "too_large", f"body exceeds {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return protocol.decode_upload(b"".join(chunks), request.headers.get("content-type"))
        except protocol.UploadError as exc:
            status = 415 if exc.code == "unsupported_media_type" else 422
            raise ApiError(status, exc.code, exc.detail) from None

    @app.post("/v1/models/{model}/adapt", response_class=Response, responses=_ADAPT_RESPONSES,
              openapi_extra={"requestBody": _UPLOAD_BODY,
                             "parameters": [{"name": "encoding", "in": "query", "required": False,
                                             "schema": {"type": "string", "enum": list(ENCODINGS)}},
                                            {"name": VERSION_HEADER, "in": "header", "required": False,
                                             "schema": {"type": "string"}}]})
    async def adapt(model: str, request: Request) -> Response:
        """Generate Θ_d for one uploaded frame feature; reply is a binary protocol frame."""
        check_auth(request)
        cloud = models.get(model)
        if cloud is None:
            raise ApiError(404, "unknown_model", f"no model {model!r} (serving: {', '.join(models)})")
        expected = request.headers.get(VERSION_HEADER)
        if expected is not None and expected != cloud.version:
            raise ApiError(409, "version_mismatch",
                           f"model {model!r} is version {cloud.version!r}, request expects {expected!r}")
        encoding = _negotiate(request, cloud)
        upload = await read_upload(request)
        frame = await batchers[model].submit(upload, encoding)
        bytes_out.labels(encoding).inc(len(frame))
        return Response(frame, media_type=MEDIA_TYPE, headers={
            "X-Model-Id": cloud.model_id, VERSION_HEADER: cloud.version, "X-Encoding": encoding})

    @app.post("/v1/noop", response_class=Response, openapi_extra={"requestBody": _UPLOAD_BODY},
              responses={200: {"description": "The parsed upload echoed as 768 float32 bytes",
                               "content": {"application/octet-stream": {}}},
                         422: {**_ERR, "description": "Wrong size or NaN/Inf"}})
    async def noop(request: Request) -> Response:
        """Same request handling as adapt, no model call: the framework's ceiling."""
        check_auth(request)
        upload = await read_upload(request)
        return Response(upload.numpy().astype("<f4").tobytes(), media_type="application/octet-stream")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"models": [m.describe() for m in models.values()],
                "protocol_version": protocol.PROTOCOL_VERSION}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: _ERR})
    async def readyz() -> Response:
        if not state["ready"]:
            return JSONResponse({"error": "not_ready", "detail": "batchers not started"}, status_code=503)
        return JSONResponse({"status": "ready", "models": list(models)})

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(models: Mapping[str, CloudModel], host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, max_batch: int = 64, max_wait_ms: float = 2.0) -> None:
    """Run the app with uvicorn in the foreground."""
    import uvicorn

    app = create_app(models, token=token, max_batch=max_batch, max_wait_ms=max_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
