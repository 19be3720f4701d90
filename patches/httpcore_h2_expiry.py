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
Pool retries that reset on a fresh connection, actors/retry_policy.py). No upstream issue.

"Idle" must mean idle, and httpcore's state alone does not: a request marks the connection
ACTIVE, then waits a loop turn for its stream slot (anyio's semaphore checkpoints) before
its stream is registered; a stream that ends in that turn finds no stream registered and
sets the connection IDLE, and it stays IDLE while the new stream runs. Expired then — by a
readable socket (the trailing WINDOW_UPDATE of the stream that ended) or, in httpcore
itself, by the keepalive on a stream longer than it —, the pool closed it under the
request: "SEND_HEADERS in state CLOSED", ReadError/WriteError (ClosedResourceError). Seen
under load as a burst's retries (tests/test_upstream_retries.py, 3 of 60 bursts of 22
calls). So here a connection with a stream registered, or a request between its first step
and its stream, has not expired (`handle_async_request` counts the latter).

Installed by `patches.install_httpcore()` in the Pool process. Written for httpcore 1.0.x
(1.0.9). On another version it logs a warning and leaves httpcore as it is: the retry of a
reset before the first byte still covers the reused dead connection, at one more attempt.
"""

from __future__ import annotations

from httpcore._async import http2

from patches import versions

LIBRARY, WRITTEN_FOR = "httpcore", "1.0."

_original_has_expired = http2.AsyncHTTP2Connection.has_expired
_original_handle_async_request = http2.AsyncHTTP2Connection.handle_async_request


async def handle_async_request(self, request):
    """httpcore's, counted: the connection is in use from the request's first step."""
    self.__dict__["_sluice_starting"] = self.__dict__.get("_sluice_starting", 0) + 1
    try:
        return await _original_handle_async_request(self, request)
    finally:
        self._sluice_starting -= 1


def has_expired(self) -> bool:
    if self.__dict__.get("_sluice_starting") or getattr(self, "_events", None):
        return False  # in use, whatever httpcore's state says (above)
    if _original_has_expired(self):
        return True
    stream = getattr(self, "_network_stream", None)
    return self.is_idle() and stream is not None and bool(stream.get_extra_info("is_readable"))


def install() -> bool:
    """Patch httpcore's async HTTP/2 connection; False (httpcore unchanged, one warning) if
    it is not the version and shape this was written against. Idempotent."""
    return versions.guarded_install(
        __name__,
        LIBRARY,
        WRITTEN_FOR,
        http2.AsyncHTTP2Connection,
        "has_expired",
        has_expired,
        needs=("has_expired", "is_idle", "handle_async_request"),
        shape="httpcore's HTTP/2 connection",
        without="closed idle connections may be reused",
        also={"handle_async_request": handle_async_request},
    )


def installed() -> bool:
    return versions.replaced(
        http2.AsyncHTTP2Connection, {"has_expired": has_expired, "handle_async_request": handle_async_request}
    )
