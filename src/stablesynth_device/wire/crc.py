"""CRC-32 (the zlib/gzip polynomial) of reply payloads, at memory speed.

A Θ_d reply is 582 KB at K = 1501 and its checksum is one full pass over it. ``zlib.crc32``
runs at 1.5–3 GB/s, 0.2–0.4 ms per fp32 reply: the largest single cost of building one.
ISA-L (the ``isal`` package, a declared dependency) computes the same CRC-32 with carry-less
multiplication, about six times faster here, and releases the GIL like zlib does. Where
``isal`` cannot be imported (a platform without its wheels), ``zlib.crc32`` is used: the
results are identical, only slower; the module checks the two agree when it loads.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Final

Buffer = bytes | bytearray | memoryview


def _load_isal() -> Callable[..., int] | None:
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    probe = bytes(range(256)) * 33
    if isal_zlib.crc32(probe) != zlib.crc32(probe) or isal_zlib.crc32(probe[:5000], 7) != zlib.crc32(probe[:5000], 7):
        return None
    return isal_zlib.crc32


_FAST: Final = _load_isal()


def accelerated() -> bool:
    """Whether payloads are checksummed by ISA-L rather than zlib."""
    return _FAST is not None


def crc32(data: Buffer, value: int = 0) -> int:
    """``zlib.crc32(data, value)``, computed by ISA-L when it is installed."""
    return int((_FAST or zlib.crc32)(data, value))
