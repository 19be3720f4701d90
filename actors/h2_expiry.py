"""Idle HTTP/2 connections the server has closed are never reused (a fix applied to
httpcore in the Pool).

Providers and their CDNs close idle connections (hypercorn, uvicorn, Node: after 5 s),
with a GOAWAY and/or a FIN. httpcore's HTTP/1.1 connection notices: its `has_expired()`
is true when an idle socket is readable (the only thing an idle HTTP/1.1 server can send
is the EOF). Its HTTP/2 connection does not look: it keeps the dead connection until its
keepalive expires, sends the next request on it and gets a reset (measured: the first
request after an idle gap > 5 s failed 2 times out of 2). An idle HTTP/2 connection
with something to read is almost always one being closed (GOAWAY, EOF); the rare PING or
SETTINGS costs one new connection, a reset costs a request. So here an idle HTTP/2
connection whose socket is readable has expired too, like HTTP/1.1's.

The keepalive below the server's idle timeout (<ACCOUNT>_KEEPALIVE_S) makes the race
narrow; this closes the rest, except a close that crosses our request on the wire (the
Pool retries that reset on a fresh connection, actors/retry_policy.py).
"""
from __future__ import annotations

import logging

from httpcore._async import http2

log = logging.getLogger("sluice.h2_expiry")

_original_has_expired = http2.AsyncHTTP2Connection.has_expired


def has_expired(self) -> bool:
    if _original_has_expired(self):
        return True
    stream = getattr(self, "_network_stream", None)
    return self.is_idle() and stream is not None and bool(stream.get_extra_info("is_readable"))


def install() -> bool:
    """Patch httpcore's async HTTP/2 connection; False (httpcore unchanged) if it is not
    the shape this was written against (httpcore 1.0.x)."""
    cls = http2.AsyncHTTP2Connection
    if cls.has_expired is has_expired:
        return True
    if not all(hasattr(cls, name) for name in ("has_expired", "is_idle")):
        log.warning("httpcore's HTTP/2 connection is not the expected shape; closed idle connections may be reused")
        return False
    cls.has_expired = has_expired
    return True
