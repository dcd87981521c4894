"""Dynamic batching of adapt requests, with per-request isolation.

Concurrent requests for one model are gathered into one batched model call (see
:class:`Batcher`). Each request gets its own outcome: an upload whose output cannot be sent
(not finite, beyond the encoding's range) gets an :class:`OutputError` (a 422 for its client)
while the frames of the other uploads in the same batch are delivered as usual.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Histogram

from stablesynth.cloud.framing import FrameWriter
from stablesynth.cloud.model import CloudModel, Expansion
from stablesynth.models.device import FEATURE_DIM

#: Θ_d of this many bytes (fp32) in all is expanded and encoded at once (5 uploads at K = 1501):
#: together they share PyTorch's cost per operation (see FrameWriter.write_into); 2–4 MB measured
#: best, against one upload or 8 MB.
GROUP_BYTES = 3 << 20

#: What a model call raises for an upload it cannot adapt to (overflow, a non-finite value...).
_MODEL_ERRORS = (ValueError, RuntimeError, FloatingPointError)


class _ExpansionError(Exception):
    """The model failed while expanding a group's Θ_d (the cause is attached)."""


class OutputError(ValueError):
    """This one upload's output cannot be sent (NaN/Inf, out of the encoding's range)."""


class ShutdownError(RuntimeError):
    """The batcher was stopped; the request was not computed."""


@dataclass
class _Pending:
    upload: torch.Tensor
    encoding: str
    future: asyncio.Future[memoryview]


class Batcher:
    """Gathers concurrent requests of one model into batched ``compute`` calls.

    Nothing waits for company by default: a request is dispatched as soon as the event
    loop has run the handlers that were already runnable, and everything queued by then
    (up to ``max_batch``) goes into the same call. While a call runs, new requests queue up
    and form the next batch, so batches grow with the load by themselves. ``max_wait_ms``
    > 0 restores a fixed gathering window after the first request.

    Calls whose expected cost (a running mean of seconds per upload, per encoding, times
    the batch size) is below ``inline_ms`` run on the event loop itself: a sub-millisecond
    model call is cheaper than the two thread hand-offs around it. Larger calls run in the
    single worker thread, where PyTorch and hashing release the GIL and the loop keeps
    reading requests. With an ``encoder`` pool, the uploads of a batch whose Θ_d is expanded
    upload by upload are expanded and encoded by its threads side by side (both release the
    GIL for the passes over Θ_d), so a reply's CPU work is not bound to one core.
    """

    def __init__(self, model: CloudModel, max_batch: int, max_wait_ms: float, executor: ThreadPoolExecutor,
                 batch_hist: Histogram, inline_ms: float = 1.0, encoder: ThreadPoolExecutor | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.executor = executor
        self.batch_hist = batch_hist
        self.inline_s = inline_ms / 1000.0
        self.encoder = encoder
        self.pending: collections.deque[_Pending] = collections.deque()
        self.writers: dict[str, FrameWriter] = {}
        self.cost: dict[str, float] = {}  # running mean of seconds per upload, by encoding
        self.scheduled = False
        self.busy = False
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False

    def warm_up(self) -> None:
        """Compute one upload in each encoding whose Θ_d is expanded upload by upload, so that the
        first request does not wait for the reply path's kernels to compile (or load from disk)."""
        upload = torch.zeros(FEATURE_DIM)
        for encoding in self.model.encodings:
            if self.model.expands_each(encoding):
                self._frames([upload], encoding)

    async def stop(self) -> None:
        self.closed = True
        while self.pending:
            p = self.pending.popleft()
            if not p.future.done():
                p.future.set_exception(ShutdownError("server shutting down"))

    async def submit(self, upload: torch.Tensor, encoding: str) -> memoryview:
        loop = self.loop or asyncio.get_running_loop()
        if self.closed:
            raise ShutdownError("server shutting down")
        fut: asyncio.Future[memoryview] = loop.create_future()
        self.pending.append(_Pending(upload, encoding, fut))
        self._schedule(loop)
        return await fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.scheduled or self.busy or not self.pending:
            return
        self.scheduled = True
        if self.max_wait > 0 and len(self.pending) < self.max_batch:
            loop.call_later(self.max_wait, self._dispatch)
        else:
            # After the callbacks already queued (other requests' handlers): they join this batch.
            loop.call_soon(self._dispatch)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self.pending and len(batch) < self.max_batch:
            p = self.pending.popleft()
            if not p.future.done():  # the client went away
                batch.append(p)
        return batch

    def _dispatch(self) -> None:
        self.scheduled = False
        loop = self.loop or asyncio.get_event_loop()
        batch = self._take()
        if not batch:
            return
        self.batch_hist.observe(len(batch))
        expected = sum(self.cost.get(p.encoding, 0.0) for p in batch)
        if expected < self.inline_s:
            try:
                frames = self._work(batch)
            except Exception as exc:  # every waiter must hear about it
                _fail(batch, exc)
            else:
                _deliver(batch, frames)
            self._schedule(loop)
            return
        self.busy = True
        cf = self.executor.submit(self._work, batch, loop)

        def done(f: Any) -> None:
            self.busy = False
            exc = f.exception()
            if exc is not None:
                _fail(batch, exc)
            else:
                _deliver(batch, f.result())
            self._schedule(loop)

        def hand_back(f: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(done, f)

        cf.add_done_callback(hand_back)

    def _work(self, batch: list[_Pending],
              loop: asyncio.AbstractEventLoop | None = None) -> list[memoryview | Exception]:
        """Frames (or the error of that one upload) for a batch, one model call per encoding.

        Run off the ``loop``, the frames of each group of uploads (see :meth:`_frames`) are handed
        to it as soon as they are written, so the first replies are sent while later ones are
        still computed, instead of the event loop and the encoders taking turns."""
        out: list[memoryview | Exception] = [memoryview(b"")] * len(batch)
        by_encoding: dict[str, list[int]] = {}
        for i, p in enumerate(batch):
            by_encoding.setdefault(p.encoding, []).append(i)
        for encoding, idx in by_encoding.items():
            t0 = time.perf_counter()
            emit = None if loop is None else functools.partial(_hand_over, loop, [batch[i] for i in idx])
            for i, frame in zip(idx, self._frames([batch[i].upload for i in idx], encoding, emit)):
                out[i] = frame
            per_upload = (time.perf_counter() - t0) / len(idx)
            old = self.cost.get(encoding)
            self.cost[encoding] = per_upload if old is None else 0.8 * old + 0.2 * per_upload
        return out


    def _frames(self, uploads: list[torch.Tensor], encoding: str,
                emit: Callable[[int, list[memoryview | Exception]], None] | None = None,
                ) -> list[memoryview | Exception]:
        """One frame or :class:`OutputError` per upload. If the batched call fails as a whole,
        each upload is computed alone, so one bad upload never fails its batch-mates.
        ``emit(start, frames)`` is called with the frames of each group of Θ_d uploads when done.

        Θ_d of a generator method is expanded and encoded a few uploads at a time
        (:data:`GROUP_BYTES`, :meth:`CloudModel.compute_each`), straight into their frames (fp32)
        or into a scratch buffer that is converted into them (:meth:`FrameWriter.write_into`), and
        checksummed while it is in the CPU cache. Small outputs (factors, driver) are encoded for
        the whole batch at once."""
        writer = self.writers.get(encoding)
        if writer is None:
            writer = self.writers[encoding] = FrameWriter(encoding, self.model.model_id, self.model.version)
        stacked = torch.stack(uploads)
        try:
            if not self.model.expands_each(encoding):
                frames = writer.write_batch(self.model.compute_batch(stacked, encoding))
                return [OutputError(str(f)) if isinstance(f, ValueError) else f for f in frames]
            each = self.model.compute_each(stacked, encoding)
        except _MODEL_ERRORS as exc:
            if len(uploads) == 1:
                return [OutputError(f"the model cannot adapt to this upload: {exc}")]
            return [f for u in uploads for f in self._frames([u], encoding)]

        shapes = self.model.output_shapes(encoding)
        n = len(uploads)
        frame_bytes = writer.frame_memory(shapes, each.scaled)
        groups = min(n, max(-(-n * frame_bytes // GROUP_BYTES), 2 if self.encoder is not None else 1))
        bounds = [(n * g // groups, n * (g + 1) // groups) for g in range(groups)]

        def group(bound: tuple[int, int]) -> list[memoryview | Exception]:
            frames = self._group(writer, shapes, each, *bound)
            if emit is not None:
                emit(bound[0], frames)
            return frames

        if self.encoder is None or groups == 1:
            return [f for b in bounds for f in group(b)]
        return [f for frames in self.encoder.map(group, bounds) for f in frames]

    def _group(self, writer: FrameWriter, shapes: dict[str, tuple[int, ...]],
               each: Expansion, lo: int, hi: int) -> list[memoryview | Exception]:
        """Frames (or errors) of uploads ``lo:hi``; if their expansion fails, each is tried alone."""

        def fill(out: dict[str, torch.Tensor]) -> None:
            # Only the model's own failures are the upload's fault; the writer's would be ours (a 500).
            try:
                each(slice(lo, hi), out)
            except _MODEL_ERRORS as exc:
                raise _ExpansionError(exc) from exc

        bounds = None if each.bounds is None else each.bounds[lo:hi].numpy()
        scaled = {name: (base, row[lo:hi], col[lo:hi]) for name, (base, row, col) in each.scaled.items()}
        try:
            frames = writer.write_into(shapes, fill, hi - lo, bounds, scaled)
        except _ExpansionError as err:
            if hi - lo > 1:  # find the upload that fails; its group-mates still get their frames
                return [f for i in range(lo, hi) for f in self._group(writer, shapes, each, i, i + 1)]
            return [OutputError(f"the model cannot adapt to this upload: {err.__cause__}")]
        return [OutputError(str(f)) if isinstance(f, ValueError) else f for f in frames]


def _hand_over(loop: asyncio.AbstractEventLoop, batch: list[_Pending], start: int,
               frames: list[memoryview | Exception]) -> None:
    """From a worker thread: deliver ``frames`` to ``batch[start:]`` on the loop."""
    with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
        loop.call_soon_threadsafe(_deliver, batch[start:start + len(frames)], frames)


def _deliver(batch: list[_Pending], frames: list[memoryview | Exception]) -> None:
    for p, frame in zip(batch, frames):
        if not p.future.done():
            if isinstance(frame, Exception):
                p.future.set_exception(frame)
            else:
                p.future.set_result(frame)


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)
