"""Graceful drain: on SIGTERM a serving process turns not-ready, lets load balancers notice, finishes
what it has, then exits.

Without it uvicorn closes its listening socket at the first SIGTERM, so a load balancer that has not
yet seen the replica go would send it requests that fail. With it (:class:`Drain`):

1. at SIGTERM (or SIGINT) the readiness routes (``/readyz``, ``/v2/health/ready``) answer 503 while
   every other route keeps serving;
2. once no request has arrived for :data:`QUIET_S` seconds and none is in flight (the balancers
   have taken the replica out), or ``drain_timeout`` seconds after the signal at the latest,
   uvicorn's own shutdown starts: it stops accepting, closes idle connections, and waits for the
   requests still running (``timeout_graceful_shutdown``, which :mod:`stablesynth.cloud.server`
   sets to the drain timeout as well);
3. a second signal ends the wait at once.

Health probes do not count as requests. The drain takes over the signal handlers uvicorn installed
(it is installed from the app's start-up, in the process's main thread; an app served from another
thread, as in tests, has no signals and no drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

#: Seconds without a new request after which a draining process stops accepting.
QUIET_S = 1.0
#: How often the drain looks whether it may stop accepting.
_POLL_S = 0.05
#: Paths that are probes, not requests: they neither count as arrivals nor hold the drain.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """The drain of one serving process: request bookkeeping (as ASGI middleware) and the signal handling."""

    def __init__(self, drain_timeout: float) -> None:
        if not 0 <= drain_timeout < math.inf:
            raise ValueError(f"drain_timeout must be a finite number >= 0, got {drain_timeout}")
        self.drain_timeout = drain_timeout
        self.draining = False
        self.in_flight = 0
        self.last_arrival = 0.0
        self._previous: dict[int, Any] = {}
        self._task: asyncio.Task[None] | None = None

    def middleware(self, app: Any) -> Callable[..., Any]:
        """An ASGI middleware around ``app`` that counts the requests in flight and notes the last arrival."""

        async def tracked(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
                await app(scope, receive, send)
                return
            self.last_arrival = time.monotonic()
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return tracked

    def install(self) -> bool:
        """Take over SIGTERM/SIGINT from the server (call from the app's start-up); False off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda s, f: loop.call_soon_threadsafe(self._signalled, s, f))
        return True

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.drain_timeout == 0:
            if self._task is not None:
                self._task.cancel()
            self._exit(sig, frame)  # a second signal: stop waiting
            return
        self.draining = True
        self._task = asyncio.get_running_loop().create_task(self._wait(sig, frame))

    async def _wait(self, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self.drain_timeout
        self.last_arrival = max(self.last_arrival, time.monotonic() - QUIET_S / 2)
        while time.monotonic() < deadline:
            if self.in_flight == 0 and time.monotonic() - self.last_arrival >= QUIET_S:
                break
            await asyncio.sleep(_POLL_S)
        self._exit(sig, frame)

    def _exit(self, sig: int, frame: FrameType | None) -> None:
        """Hand the signal to the handler the server installed (uvicorn: start its shutdown)."""
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            with contextlib.suppress(Exception):
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)
