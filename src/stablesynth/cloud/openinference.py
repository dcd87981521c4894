"""The Open Inference Protocol (KServe V2) beside the native route: routes, tensor codec, errors.

Routes (registered on the service's app by :func:`register`):

- ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready`` (no token: probes of load balancers);
- ``GET /v2/models/{m}[/versions/{v}]``, ``.../ready``, ``POST .../infer`` (bearer token as on /v1).

The model has one input, ``feature`` (FP32, shape ``[B, 192]``), and one output per tensor of Θ_d
(``weight`` FP32 ``[B, K, 96]``, ``bias`` FP32 ``[B, K]``). Tensors travel as JSON ``data`` or in the
binary tensor data extension: the body is ``Inference-Header-Content-Length`` bytes of JSON, then
the raw little-endian tensors (``binary_data_size`` per input; ``binary_data`` per output or
``binary_data_output`` for all of them in the reply).

Each row of an infer request is one upload to the model's batcher in the native fp32 encoding, so
it is batched with the native route's requests and gets exactly the native reply's bytes: the
outputs are slices of the native frame's payload, sent as they are (binary) or as the float32
values of those bytes (JSON). Errors are the protocol's ``{"error": message}`` with a 4xx for
whatever the client got wrong (503 while the service is not ready or shutting down).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stablesynth.cloud.batching import Batcher, OutputError, ShutdownError
from stablesynth.cloud.model import CloudModel
from stablesynth_device.wire import protocol, uploads

INPUT_NAME = "feature"
DATATYPE = "FP32"
#: The encoding of the native frames the V2 outputs are cut from.
ENCODING = "fp32"
HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"
#: Parameters the protocol's binary extension defines; any other is refused.
REQUEST_PARAMETERS = frozenset({"binary_data_output"})
INPUT_PARAMETERS = frozenset({"binary_data_size"})
OUTPUT_PARAMETERS = frozenset({"binary_data"})
REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OUTPUT_KEYS = frozenset({"name", "parameters"})


class V2Error(Exception):
    """A request the protocol answers with ``{"error": message}`` and ``status``; ``code`` labels the metric."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class _Output:
    name: str
    shape: tuple[int, ...]  # of one upload
    offset: int  # in the frame
    nbytes: int


def _frame_outputs(frame: memoryview) -> tuple[_Output, ...]:
    """Where each fp32 tensor of a native frame lies in it (the frame format: stablesynth_device.wire.protocol)."""
    header, start = protocol.decode_header(bytes(frame[:protocol.PREFIX_BYTES + protocol.MAX_HEADER_BYTES]))
    outs, offset = [], start
    for info in header.tensors:
        outs.append(_Output(info.name, tuple(info.shape), offset, info.nbytes))
        offset += info.nbytes
    return tuple(outs)


class _Layouts:
    """The outputs' places in a model's frames, found once per header length: the header of a model's fp32
    frames differs from frame to frame only in the checksum's digits, which have a fixed length."""

    def __init__(self) -> None:
        self._by_length: dict[tuple[str, int], tuple[_Output, ...]] = {}

    def of(self, model_id: str, frame: memoryview) -> tuple[_Output, ...]:
        hlen = struct.unpack_from("<I", frame, 6)[0] if len(frame) >= protocol.PREFIX_BYTES else -1
        key = (model_id, hlen)
        outs = self._by_length.get(key)
        if outs is None:
            outs = self._by_length[key] = _frame_outputs(frame)
        return outs


def _output_shapes(cloud: CloudModel) -> dict[str, tuple[int, ...]]:
    try:
        return cloud.output_shapes(ENCODING)
    except ValueError:  # a method without a generator: its shapes from one call
        out = cloud.compute_batch(torch.zeros(1, uploads.UPLOAD_DIM), ENCODING)
        return {k: tuple(v.shape[1:]) for k, v in out.items()}


def model_metadata(cloud: CloudModel) -> dict[str, Any]:
    """The V2 model metadata: the one input and Θ_d's tensors, batch dimension first (-1: any)."""
    return {"name": cloud.model_id, "versions": [cloud.version], "platform": "stablesynth",
            "inputs": [{"name": INPUT_NAME, "datatype": DATATYPE, "shape": [-1, uploads.UPLOAD_DIM]}],
            "outputs": [{"name": n, "datatype": DATATYPE, "shape": [-1, *s]}
                        for n, s in _output_shapes(cloud).items()]}


# ----------------------------------------------------------------------------- request codec


def _check_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise V2Error(400, "bad_request", f"{where}: unknown field {unknown[0]!r}")


def _parameters(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise V2Error(400, "bad_request", f"{where}: 'parameters' must be an object")
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise V2Error(400, "unknown_parameter", f"{where}: unknown parameter {unknown[0]!r}")
    return params


def _flatten(data: Any, depth: int, out: list[float]) -> None:
    """Row-major values of a flat or nested JSON array, numbers only (no booleans, no strings)."""
    if type(data) is not list:
        raise V2Error(400, "bad_data", "input 'data' must be an array of numbers")
    if all(type(v) is float or type(v) is int for v in data):
        out.extend(data)
        return
    if depth <= 0:
        raise V2Error(400, "bad_data", "input 'data' holds something other than numbers")
    for v in data:
        _flatten(v, depth - 1, out)


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: the uploads ``[B, 192]`` and, per output to send, whether in binary."""

    request_id: str | None
    features: np.ndarray
    outputs: tuple[tuple[str, bool], ...]


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """``Inference-Header-Content-Length``: ``None`` (the whole body is JSON) or the JSON's length."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise V2Error(400, "bad_header_length", f"Inference-Header-Content-Length {value[:20]!r} is not a "
                                                f"non-negative integer")
    n = int(value)
    if not 0 < n <= body_size:
        raise V2Error(400, "bad_header_length", f"Inference-Header-Content-Length {n} outside the body "
                                                f"of {body_size} bytes")
    return n


def parse_infer(body: bytes, header_length: int | None, output_names: Sequence[str],
                max_batch: int) -> InferRequest:
    """Parse and check an infer request body (JSON, or JSON + binary tensors); raises only :class:`V2Error`."""
    split = len(body) if header_length is None else header_length
    try:
        obj = json.loads(body[:split])
    except RecursionError:
        raise V2Error(400, "bad_json", "request JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise V2Error(400, "bad_json", f"request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise V2Error(400, "bad_json", "request must be a JSON object")
    _check_keys(obj, REQUEST_KEYS, "request")
    params = _parameters(obj, REQUEST_PARAMETERS, "request")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise V2Error(400, "bad_request", "parameter 'binary_data_output' must be a boolean")
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(400, "bad_request", "'id' must be a string")

    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error(400, "bad_request", f"'inputs' must hold exactly one tensor, {INPUT_NAME!r}")
    tensor = inputs[0]
    _check_keys(tensor, INPUT_KEYS, "input")
    if tensor.get("name") != INPUT_NAME:
        raise V2Error(400, "unknown_input", f"input {tensor.get('name')!r}; the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != DATATYPE:
        raise V2Error(400, "bad_datatype", f"input datatype {tensor.get('datatype')!r}; expected {DATATYPE}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int for d in shape)
            or shape[1] != uploads.UPLOAD_DIM or not 1 <= shape[0] <= max_batch):
        raise V2Error(400, "bad_shape", f"input shape {shape!r}; expected [B, {uploads.UPLOAD_DIM}] with "
                                        f"1 <= B <= {max_batch}")
    count = shape[0] * shape[1]
    size = _parameters(tensor, INPUT_PARAMETERS, "input").get("binary_data_size")
    binary = body[split:]
    if size is not None:
        if "data" in tensor:
            raise V2Error(400, "bad_request", "input has both 'data' and 'binary_data_size'")
        if type(size) is not int or size != 4 * count:
            raise V2Error(400, "bad_binary_size", f"binary_data_size {size!r}; shape {shape} of FP32 is "
                                                  f"{4 * count} bytes")
        if len(binary) != size:
            raise V2Error(400, "bad_binary_size", f"binary_data_size {size} but {len(binary)} bytes follow the "
                                                  f"JSON header")
        features = np.frombuffer(binary, "<f4").astype(np.float32).reshape(shape)
    else:
        if binary:
            raise V2Error(400, "bad_binary_size", f"{len(binary)} bytes follow the JSON header but no input "
                                                  f"has binary_data_size")
        if "data" not in tensor:
            raise V2Error(400, "bad_data", "input has neither 'data' nor 'binary_data_size'")
        values: list[float] = []
        _flatten(tensor["data"], len(shape) - 1, values)
        if len(values) != count:
            raise V2Error(400, "bad_shape", f"input data holds {len(values)} values, shape {shape} needs {count}")
        try:
            with np.errstate(over="ignore"):  # beyond float32: Inf, refused below
                features = np.asarray(values, dtype=np.float32).reshape(shape)
        except OverflowError:  # an integer beyond any float
            raise V2Error(422, "out_of_range", "input holds a number beyond float32") from None
    for row in features:
        try:
            uploads.check_feature(row)
        except uploads.UploadError as exc:
            raise V2Error(422, exc.code, exc.detail) from None

    requested = obj.get("outputs")
    if requested is None:
        outputs = tuple((n, binary_default) for n in output_names)
    else:
        if not isinstance(requested, list) or not requested:
            raise V2Error(400, "bad_request", "'outputs' must be a non-empty array")
        chosen: list[tuple[str, bool]] = []
        for out in requested:
            if not isinstance(out, dict):
                raise V2Error(400, "bad_request", "each of 'outputs' must be an object")
            _check_keys(out, OUTPUT_KEYS, "output")
            name = out.get("name")
            if name not in output_names:
                raise V2Error(400, "unknown_output", f"output {name!r}; the model's outputs are "
                                                     f"{', '.join(output_names)}")
            if any(name == n for n, _ in chosen):
                raise V2Error(400, "bad_request", f"output {name!r} requested twice")
            as_binary = _parameters(out, OUTPUT_PARAMETERS, "output").get("binary_data", binary_default)
            if not isinstance(as_binary, bool):
                raise V2Error(400, "bad_request", "parameter 'binary_data' must be a boolean")
            chosen.append((name, as_binary))
        outputs = tuple(chosen)
    return InferRequest(request_id, features, outputs)


# ----------------------------------------------------------------------------- replies


class _ChunkedBody(Response):
    """A reply sent as several buffers (the JSON header, then slices of the native frames) without joining them."""

    def __init__(self, chunks: list[bytes | memoryview], headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.chunks = chunks
        self.raw_headers = [*headers, (b"content-length", str(sum(len(c) for c in chunks)).encode())]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last = len(self.chunks) - 1
        for i, chunk in enumerate(self.chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < last})


def infer_reply(cloud: CloudModel, request: InferRequest, frames: Sequence[memoryview],
                layout: tuple[_Output, ...]) -> Response:
    """The V2 reply: each requested output, the rows' slices of the native frames, as JSON data or binary."""
    by_name = {o.name: o for o in layout}
    batch = len(frames)
    described: list[dict[str, Any]] = []
    spans: list[list[int]] = []  # [frame, start, end] of the binary section, in order
    for name, as_binary in request.outputs:
        o = by_name[name]
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE, "shape": [batch, *o.shape]}
        if as_binary:
            entry["parameters"] = {"binary_data_size": o.nbytes * batch}
            for i in range(batch):
                if spans and spans[-1][0] == i and spans[-1][2] == o.offset:
                    spans[-1][2] += o.nbytes  # the next tensor of the same frame: one buffer to send
                else:
                    spans.append([i, o.offset, o.offset + o.nbytes])
        else:
            # float32 → Python float is exact, and so is its repr: the JSON carries the same bits.
            entry["data"] = [v for f in frames for v in np.frombuffer(f[o.offset:o.offset + o.nbytes], "<f4").tolist()]
        described.append(entry)
    binary = [frames[i][lo:hi] for i, lo, hi in spans]
    reply: dict[str, Any] = {"model_name": cloud.model_id, "model_version": cloud.version, "outputs": described}
    if request.request_id is not None:
        reply["id"] = request.request_id
    head = json.dumps(reply, separators=(",", ":")).encode()
    if not binary:
        return _ChunkedBody([head], [(b"content-type", b"application/json")])
    return _ChunkedBody([head, *binary], [(b"content-type", b"application/octet-stream"),
                                          (HEADER_LENGTH.encode(), str(len(head)).encode())])


def _error(exc: V2Error) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


# ----------------------------------------------------------------------------- routes


def register(app: FastAPI, models: Mapping[str, CloudModel], batchers: Mapping[str, Batcher], *,
             check_auth: Callable[[Request], None], is_ready: Callable[[], bool], max_body_bytes: int,
             max_batch: int, count_error: Callable[[str], None]) -> None:
    """Add the V2 routes to ``app``: the same models, batchers, token check and body limit as the native route.

    ``check_auth`` raises an exception with ``status``/``detail`` (the native route's) for a bad token;
    ``count_error(code)`` counts an error reply."""
    layouts = _Layouts()
    output_names: dict[str, tuple[str, ...]] = {}

    def fail(exc: V2Error) -> JSONResponse:
        count_error(exc.code)
        return _error(exc)

    def authorize(request: Request) -> None:
        try:
            check_auth(request)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise V2Error(status, getattr(exc, "code", "unauthorized"), getattr(exc, "detail", str(exc))) from None

    def lookup(request: Request) -> CloudModel:
        name = request.path_params["model"]
        cloud = models.get(name)
        if cloud is None:
            raise V2Error(404, "unknown_model", f"no model {name!r} (serving: {', '.join(models)})")
        version = request.path_params.get("version")
        if version is not None and version != cloud.version:
            raise V2Error(404, "unknown_version", f"model {name!r} has version {cloud.version!r}, not {version!r}")
        return cloud

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise V2Error(413, "too_large", f"body of {declared} bytes exceeds {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise V2Error(413, "too_large", f"body exceeds {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def server_metadata() -> dict[str, Any]:
        return {"name": "stablesynth", "version": str(protocol.PROTOCOL_VERSION), "extensions": [BINARY_EXTENSION]}

    async def live() -> dict[str, bool]:
        return {"live": True}

    async def ready() -> JSONResponse:
        if not is_ready():
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    async def metadata(request: Request) -> Response:
        try:
            authorize(request)
            return JSONResponse(model_metadata(lookup(request)))
        except V2Error as exc:
            return fail(exc)

    async def model_ready(request: Request) -> Response:
        try:
            authorize(request)
            cloud = lookup(request)
        except V2Error as exc:
            return fail(exc)
        ok = is_ready()
        return JSONResponse({"name": cloud.model_id, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        try:
            authorize(request)
            cloud = lookup(request)
            body = await read_body(request)
            names = output_names.get(cloud.model_id)
            if names is None:
                names = output_names[cloud.model_id] = tuple(_output_shapes(cloud))
            parsed = parse_infer(body, parse_header_length(request.headers.get(HEADER_LENGTH), len(body)),
                                 names, max_batch)
            batcher = batchers[cloud.model_id]
            rows = torch.from_numpy(parsed.features)
            try:
                if len(rows) == 1:
                    frames = [await batcher.submit(rows[0], ENCODING)]
                else:
                    frames = list(await asyncio.gather(*(batcher.submit(r, ENCODING) for r in rows)))
            except OutputError as exc:
                raise V2Error(422, "unadaptable_upload", str(exc)) from None
            except ShutdownError:
                raise V2Error(503, "shutting_down", "the server is shutting down; retry") from None
            layout = layouts.of(cloud.model_id, frames[0])
            if all(as_binary for _, as_binary in parsed.outputs):
                return infer_reply(cloud, parsed, frames, layout)
            # Θ_d as JSON text is tens of milliseconds of work (145,597 numbers at K = 1501): off the event
            # loop, which then still gets the interpreter between the encoder's time slices.
            return await asyncio.to_thread(infer_reply, cloud, parsed, frames, layout)
        except V2Error as exc:
            return fail(exc)

    app.add_api_route("/v2", server_metadata, methods=["GET"], tags=["v2"])
    app.add_api_route("/v2/health/live", live, methods=["GET"], tags=["v2"])
    app.add_api_route("/v2/health/ready", ready, methods=["GET"], tags=["v2"],
                      responses={503: {"description": "Starting or draining"}})
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.add_api_route(base, metadata, methods=["GET"], tags=["v2"])
        app.add_api_route(base + "/ready", model_ready, methods=["GET"], tags=["v2"])
        app.add_api_route(base + "/infer", infer, methods=["POST"], tags=["v2"], response_class=Response)


__all__ = ["INPUT_NAME", "InferRequest", "V2Error", "infer_reply", "model_metadata", "parse_header_length",
           "parse_infer", "register"]
