"""Connection hygiene in the server itself: header cap, read timeouts, load shedding.

uvicorn's httptools protocol bounds the keep-alive idle time and (``limit_concurrency``)
answers 503 once too many connections or requests are open, but it holds a connection that
never finishes its headers or its body forever, and buffers headers of any size.
:class:`GuardedHttpProtocol` adds, per connection:

- a new connection must send its first byte within ``idle_timeout`` seconds (short: an honest
  client connects to send), then its request head (request line + headers) within
  ``header_timeout`` seconds of that byte or of the first byte after an idle keep-alive period,
  and the head may not
  exceed ``max_header_bytes`` (431, connection closed; memory held is bounded by the cap
  plus one socket read);
- the body must arrive within ``body_timeout`` seconds of the end of the head;
- otherwise the connection is closed (the app sees a disconnect);
- a reply the client stops reading is bounded too: whenever more than the transport's
  high-water mark (64 KiB) of it waits to be sent, or any of it is still unsent when the
  keep-alive period ends, the client must read within ``send_timeout`` seconds (from high
  to low water, i.e. the deadline is between two reads, like nginx's ``send_timeout``),
  else the connection is aborted and the unsent bytes are dropped. Without this a client
  that stops reading would hold its connection and a 582 KB reply forever;
- what waits to be sent is the reply's own bytes, never a view of a buffer it shares with
  other replies (:class:`UnpinnedTransport`): Θ_d frames are written a few to a buffer, so a
  client that stops reading would otherwise keep its group's 3 MB, not its 582 KB;
- one peer address holds at most ``max_connections_per_client`` connections at once; beyond
  that a new connection gets 503 and is closed, so one client's idle connections cannot take
  the ``limit_concurrency`` slots of the others (counted per server process: with ``--workers
  N`` an address may hold up to N times as many);
- a reply sent before its request's body has arrived (a 401 or 413 that did not read the body)
  closes the connection (``connection: close``) instead of reading and discarding the body.

The read limits act before the app runs, so before the bearer token is checked.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn
from pydantic import Field
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stablesynth.config import Config


class ServeLimits(Config):
    """Per-process connection limits (defaults suit a service behind a reverse proxy or not)."""

    max_header_bytes: int = Field(16 * 1024, ge=1024)
    #: Seconds a client may take to send its request head, then its body, and to read the reply.
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(10.0, gt=0)
    send_timeout: float = Field(10.0, gt=0)
    keep_alive_timeout: int = Field(5, ge=1)
    #: Seconds a new connection may stay silent before its first byte.
    idle_timeout: float = Field(2.0, gt=0)
    #: Open connections or running requests beyond which new requests get 503 (load shedding).
    limit_concurrency: int = Field(1024, ge=1)
    #: Open connections of one peer address beyond which its new connections get 503 (behind a
    #: reverse proxy every client has the proxy's address: raise it to ``limit_concurrency``).
    max_connections_per_client: int = Field(128, ge=1)
    backlog: int = Field(1024, ge=1)


class _Deadline:
    """One timer on the event loop that is armed, re-armed or cancelled; it forgets itself when it fires."""

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self, loop: asyncio.AbstractEventLoop, seconds: float, callback: Callable[[], None]) -> None:
        self.cancel()
        self._handle = loop.call_later(seconds, self._fire, callback)

    def _fire(self, callback: Callable[[], None]) -> None:
        self._handle = None
        callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class UnpinnedTransport:
    """A transport whose unsent bytes are its own: a ``memoryview`` is written to the socket as far
    as it takes it at once, and only the rest, copied, is handed to the transport.

    Transports keep what they cannot send at once as given (uvloop, and asyncio from Python
    3.12 on, without a copy), so a view would keep the whole buffer behind it alive until
    the client reads. The direct write is what the transport itself tries first (uvloop's
    ``_try_write``), made only while nothing of this connection waits to be sent, so bytes
    stay in order. Anything else (bytes, a TLS transport, a socket error) goes to the
    transport as is. Every other attribute is the transport's.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        plain = sock is not None and not transport.get_extra_info("sslcontext")
        self._fd = sock.fileno() if plain else -1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        t = self._transport
        if type(data) is not memoryview or self._fd < 0 or t.is_closing() or t.get_write_buffer_size():
            t.write(data)
            return
        try:
            sent = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            t.write(data)  # the transport meets the same error and closes the connection its way
            return
        if sent < len(data):
            t.write(data[sent:].tobytes())


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config plus :class:`ServeLimits` (picklable, so worker processes get it too)."""

    def __init__(self, app: Any, limits: ServeLimits | None = None, **kwargs: Any) -> None:
        self.limits = limits or ServeLimits()
        #: Open connections per peer address in this process (see GuardedHttpProtocol).
        self.peer_connections: Counter[str] = Counter()
        kwargs.setdefault("http", GuardedHttpProtocol)
        kwargs.setdefault("timeout_keep_alive", self.limits.keep_alive_timeout)
        kwargs.setdefault("limit_concurrency", self.limits.limit_concurrency)
        kwargs.setdefault("backlog", self.limits.backlog)
        super().__init__(app, **kwargs)


def _error_response(status: int, reason: str, code: str, detail: str) -> bytes:
    body = json.dumps({"error": code, "detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("latin-1") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header cap, head/body read deadlines and a send deadline."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits: ServeLimits = getattr(config, "limits", None) or ServeLimits()
        self._read_deadline = _Deadline()
        self._send_deadline = _Deadline()
        self._in_head = True
        self._head_bytes = 0
        self._rejected = False
        self._silent = True  # nothing received yet on this connection
        self._peer: str | None = None
        self._keep_alive_after_body = False
        peers = getattr(config, "peer_connections", None)
        self._peers: Counter[str] = peers if peers is not None else Counter()

    # -- deadlines
    def _arm(self, seconds: float) -> None:
        self._read_deadline.arm(self.loop, seconds, self._expire)

    def _disarm(self) -> None:
        self._read_deadline.cancel()

    def _expire(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.scope["stablesynth.timed_out"] = True  # the app's disconnect was a timeout
            self.transport.close()

    def _arm_send(self) -> None:
        # Not re-armed while it runs: the clock counts from the first unsent byte.
        if not self._send_deadline.armed:
            self._send_deadline.arm(self.loop, self.limits.send_timeout, self._send_expired)

    def _disarm_send(self) -> None:
        self._send_deadline.cancel()

    def _send_expired(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the client to read what is buffered

    def _reject(self, status: int, reason: str, code: str, detail: str) -> None:
        self._rejected = True
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_error_response(status, reason, code, detail))
            self.transport.close()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(UnpinnedTransport(transport))  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer = str(peer[0])
            self._peers[self._peer] += 1
            if self._peers[self._peer] > self.limits.max_connections_per_client:
                self._reject(503, "Service Unavailable", "too_many_connections",
                             f"more than {self.limits.max_connections_per_client} open connections "
                             "from this address")
                return
        self._arm(self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_send()
        if self._peer is not None:
            left = self._peers[self._peer] - 1
            if left > 0:
                self._peers[self._peer] = left
            else:
                del self._peers[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The reply waiting in the transport exceeds the high-water mark: the client must read."""
        super().pause_writing()
        self._arm_send()

    def resume_writing(self) -> None:
        self._disarm_send()
        super().resume_writing()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._arm_send()  # closing waits for the unsent bytes: bound that wait as well
        super().timeout_keep_alive_handler()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            if self._silent or not self._read_deadline.armed:  # first bytes, or after keep-alive
                self._silent = False
                self._arm(self.limits.header_timeout)
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "Bad Request", "bad_request", "protocol upgrades are not supported")
        except httptools.HttpParserError:
            if not self._rejected:
                self._reject(400, "Bad Request", "bad_request", "invalid HTTP request")
            return
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._reject(431, "Request Header Fields Too Large", "headers_too_large",
                         f"request head exceeds {self.limits.max_header_bytes} bytes")

    # -- parser callbacks
    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._reject(431, "Request Header Fields Too Large", "headers_too_large",
                         f"request head exceeds {self.limits.max_header_bytes} bytes")
            raise ValueError("request head too large")  # stops the parser
        self._in_head = False
        self._arm(self.limits.body_timeout)
        super().on_headers_complete()
        # Keep-alive only once the body has arrived: a reply sent before (an early 401 or 413)
        # closes the connection rather than reading a body nobody wants. A body that comes with
        # its head (the usual upload) completes before the app runs, so this costs nothing.
        cycle = self.cycle
        if cycle is not None and cycle.keep_alive and not cycle.response_complete:
            self._keep_alive_after_body, cycle.keep_alive = True, False

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        self._head_bytes = 0
        if self._keep_alive_after_body:
            self._keep_alive_after_body = False
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                cycle.keep_alive = True
        super().on_message_complete()
