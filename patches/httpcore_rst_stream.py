"""RST_STREAM(CANCEL) for an HTTP/2 response closed before its end (a fix applied to
httpcore in the Pool).

httpcore closes an unfinished HTTP/2 response without telling the server: no RST_STREAM
(encode/httpcore#944, https://github.com/encode/httpcore/issues/944, was declined). So the
provider would keep generating, and billing, a cancelled stream until its flow-control
window filled. `reset(response)` sends the RST_STREAM the way httpcore would have:
it unwraps the pool's `PoolByteStream` to httpcore's `HTTP2ConnectionByteStream`, takes
its connection's h2 state machine and stream id, resets the stream and writes what h2
queued. Those are all private names, which is why this lives here and not in
actors/upstream.py (which calls `reset` when a call is cancelled). Over HTTP/1.1 it does
nothing: closing the unfinished response closes the connection, which the server sees.

A stream given up *before its response headers* (a client that left while the Pool waited
for them, or a read timeout with no headers) never becomes a response: httpcore forgets
its id in `AsyncHTTP2Connection._response_closed` and the provider kept generating it to
the end (found by a burst of clients leaving right after their 200; the Pacer had already
given the lease back). So `install()` also wraps `_response_closed`, the one place every
HTTP/2 stream of httpcore ends: a stream h2 still holds open there is reset first. A
stream that ended normally is closed in h2 by then and untouched. `reset` does nothing
until `install()` checked the private names. Called by `patches.install_httpcore()` in
the Pool process. Written for httpcore 1.0.x (1.0.9) and h2 4.x; it fails loudly on
another version: without it every cancelled stream costs its provider tokens unnoticed.
"""

from __future__ import annotations

import h2.errors
from httpcore._async import connection_pool, http2

from patches import versions

LIBRARY, WRITTEN_FOR = "httpcore", "1.0."
H2, H2_WRITTEN_FOR = "h2", "4."

_checked = False
_original_response_closed = http2.AsyncHTTP2Connection._response_closed
RESET_WRITE_TIMEOUT_S = 5.0


class _WriteOnly:
    """What httpcore's `_write_outgoing_data` reads of a request: its write timeout."""

    extensions = {"timeout": {"write": RESET_WRITE_TIMEOUT_S}}


async def _response_closed(self, stream_id: int) -> None:
    """httpcore's, after resetting a stream that h2 still holds open (given up unfinished)."""
    await _reset_if_open(self, stream_id)
    await _original_response_closed(self, stream_id)


def install() -> None:
    """Check httpcore (and h2) are what `reset` was written for, and wrap `_response_closed`;
    raise if not. Idempotent."""
    global _checked
    versions.check(__name__, LIBRARY, WRITTEN_FOR)
    versions.check(__name__, H2, H2_WRITTEN_FOR)
    if not (
        hasattr(http2, "HTTP2ConnectionByteStream")
        and hasattr(connection_pool, "PoolByteStream")
        and callable(getattr(http2.AsyncHTTP2Connection, "_write_outgoing_data", None))
        and callable(getattr(http2.AsyncHTTP2Connection, "_response_closed", None))
    ):
        raise RuntimeError("httpcore's HTTP/2 streams are not the shape patches/httpcore_rst_stream.py expects")
    http2.AsyncHTTP2Connection._response_closed = _response_closed
    _checked = True


def installed() -> bool:
    return _checked and http2.AsyncHTTP2Connection._response_closed is _response_closed


async def _reset_if_open(conn, stream_id: int) -> None:
    h2_state = getattr(conn, "_h2_state", None)
    try:
        stream = h2_state.streams.get(stream_id) if h2_state is not None else None
        if stream is None or stream.closed:
            return
        h2_state.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await conn._write_outgoing_data(_WriteOnly)
    except Exception:  # the stream or connection already ended: nothing left to cancel
        pass


async def reset(response) -> None:
    """Send RST_STREAM(CANCEL) for an unfinished HTTP/2 response (no-op for HTTP/1.1, and
    until `install()` checked httpcore)."""
    if not _checked:
        return
    stream = response.stream
    while hasattr(stream, "_stream"):  # unwrap the pool's PoolByteStream
        stream = stream._stream
    conn = getattr(stream, "_connection", None)
    stream_id = getattr(stream, "_stream_id", None)
    h2_state = getattr(conn, "_h2_state", None)
    if conn is None or h2_state is None or stream_id is None:
        return
    try:
        h2_state.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await conn._write_outgoing_data(stream._request)
    except Exception:  # the stream or connection already ended: nothing left to cancel
        pass
