"""Who can reach a server bound to a host, and what that means for its defaults.

A server bound to a loopback address (127.0.0.0/8, ::1, ``localhost``) answers only this
machine; any other host (an interface address, ``0.0.0.0``, ``::``, a name) may answer
anyone who can route to it. Off loopback the service refuses to start without a token unless
the operator says ``--allow-unauthenticated`` (and is then warned on every start), and keeps
``/docs`` and ``/openapi.json`` off unless asked for.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the server to this machine only."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name may resolve to any interface


def unauthenticated_warning(host: str, token: str | None, allow_unauthenticated: bool) -> str | None:
    """The warning to print on start, ``None`` if there is nothing to warn about; ValueError if a
    server on ``host`` without a token must not start."""
    if token is not None or is_loopback(host):
        return None
    if not allow_unauthenticated:
        raise ValueError(f"--host {host}: not a loopback address, and no token: anyone who reaches it could use "
                         "the service; pass --token-file FILE (or $STABLESYNTH_TOKEN), or --allow-unauthenticated")
    return (f"warning: serving on {host} without a token (--allow-unauthenticated): anyone who reaches "
            "this address can use the service")
