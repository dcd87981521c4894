"""The server's own connection hygiene below the app: what a connection may hold while it waits."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest
import uvloop

from stablesynth.cloud.limits import UnpinnedTransport


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_reply_that_waits_for_its_reader_holds_only_its_own_bytes(loop_factory: Any) -> None:
    """A frame is a view of a buffer it shares with other replies; what the client has not read yet
    must not keep that buffer alive (uvloop keeps a view as given, so the control pins it)."""
    loop = loop_factory()

    async def scenario(wrap: bool) -> tuple[bool, bytes, bytes]:
        server, client = socket.socketpair()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server)
        shared = bytearray(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
        view = memoryview(shared)[1000:601_000]
        expected = bytes(view)
        (UnpinnedTransport(transport) if wrap else transport).write(view)
        assert transport.get_write_buffer_size() > 0  # the reader has not read: most of it waits
        view.release()
        try:
            shared.extend(b"x")  # a bytearray cannot grow while anything holds a view of it
            pinned = False
        except BufferError:
            pinned = True
        got = bytearray()
        while len(got) < len(expected):
            got += await loop.sock_recv(client, 1 << 16)
        transport.close()
        client.close()
        return pinned, bytes(got), expected

    try:
        pinned, got, expected = loop.run_until_complete(scenario(wrap=True))
        assert not pinned and got == expected
        if loop_factory is uvloop.new_event_loop:
            assert loop.run_until_complete(scenario(wrap=False))[0]  # what the wrapper prevents
    finally:
        loop.close()
