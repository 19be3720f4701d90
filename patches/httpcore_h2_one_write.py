"""An HTTP/2 request goes out in one socket write (a fix applied to httpcore in the Pool).

httpcore sends a request with a body as three writes: the HEADERS frame, then each DATA
frame, then an empty DATA frame with END_STREAM, each through `_write_outgoing_data`, and
each write is an anyio `send`, which yields to the event loop once. The provider's server
wakes up for the first segment, parses the HEADERS alone, and reads again for the body.
Measured with bench.trace at one stream (docs in bench/NOTES.md, "Added TTFT at low
load"): the two extra writes cost ~0.2 ms on the Pool's side and the provider's second
read ~0.15 ms more, on every call's path to the provider, i.e. on its TTFT.

Here a request whose body is already in memory (httpcore's `ByteStream`: the Pool always
sends `content=bytes`), is at most `ONE_WRITE_MAX` and fits the stream's send window goes out as HEADERS + DATA
frames, END_STREAM on the last, in one write. Anything else (a streamed body, a larger
one) is sent exactly as httpcore sends it. Nothing awaits between the
HEADERS and the body on the one-write path, so no other stream's frames interleave with
them (h2's outgoing buffer would keep them in order anyway). No upstream issue.

Installed by `patches.install_httpcore()` in the Pool process. Written for httpcore 1.0.x
(1.0.9) with h2 4.x; an optimisation, so on another httpcore, or one whose connection lacks
the methods it relies on, it logs a warning and leaves httpcore as it is.
"""

from __future__ import annotations

from httpcore._async import http2
from httpcore._models import ByteStream

from patches import versions

LIBRARY, WRITTEN_FOR = "httpcore", "1.0."

# Larger bodies go as httpcore sends them: their transfer, not two writes, is what they
# wait for, and one write would hold a second copy of the whole body in h2's buffer.
ONE_WRITE_MAX = 256 * 1024

_original_send_request_headers = http2.AsyncHTTP2Connection._send_request_headers
_original_send_request_body = http2.AsyncHTTP2Connection._send_request_body


def whole_body(connection, request, stream_id: int) -> bytes | None:
    """The request's body if it can go out with its HEADERS in one write, else None."""
    stream = request.stream
    if not isinstance(stream, ByteStream) or not http2.has_body_headers(request):
        return None
    content = stream._content
    if len(content) > ONE_WRITE_MAX:
        return None
    state = connection._h2_state
    if stream_id in state.streams:
        window = state.local_flow_control_window(stream_id)
    else:  # before its HEADERS: a new stream's window, within the connection's
        window = min(state.outbound_flow_control_window, state.remote_settings.initial_window_size)
    return content if len(content) <= window else None


async def send_request_headers(self, request, stream_id: int) -> None:
    """Replacement for `AsyncHTTP2Connection._send_request_headers`: httpcore's, without
    the write when the body will follow in the same one (`send_request_body`)."""
    if whole_body(self, request, stream_id) is None:
        await _original_send_request_headers(self, request, stream_id)
        return
    authority = [v for k, v in request.headers if k.lower() == b"host"][0]
    headers = [
        (b":method", request.method),
        (b":authority", authority),
        (b":scheme", request.url.scheme),
        (b":path", request.url.target),
    ] + [(k.lower(), v) for k, v in request.headers if k.lower() not in (b"host", b"transfer-encoding")]
    self._h2_state.send_headers(stream_id, headers, end_stream=False)
    self._h2_state.increment_flow_control_window(2**24, stream_id=stream_id)
    self.__dict__.setdefault("_sluice_unsent", set()).add(stream_id)


async def send_request_body(self, request, stream_id: int) -> None:
    """Replacement for `AsyncHTTP2Connection._send_request_body`: the whole body, and the
    HEADERS still in h2's buffer, in one write."""
    unsent = self.__dict__.get("_sluice_unsent")
    held = unsent is not None and stream_id in unsent
    if held:
        unsent.discard(stream_id)
    content = whole_body(self, request, stream_id)
    if content is None:
        if held:  # cannot happen (nothing awaited since the HEADERS), but never strand them
            await self._write_outgoing_data(request)
        await _original_send_request_body(self, request, stream_id)
        return
    size = self._h2_state.max_outbound_frame_size
    if not content:
        self._h2_state.end_stream(stream_id)
    for start in range(0, len(content), size):
        end = start + size
        self._h2_state.send_data(stream_id, content[start:end], end_stream=end >= len(content))
    await self._write_outgoing_data(request)


def install() -> bool:
    """Patch httpcore's async HTTP/2 connection; False (httpcore unchanged, one warning) if
    it is not the version and shape this was written against. Idempotent."""
    return versions.guarded_install(
        __name__,
        LIBRARY,
        WRITTEN_FOR,
        http2.AsyncHTTP2Connection,
        "_send_request_headers",
        send_request_headers,
        needs=("_send_request_headers", "_send_request_body", "_write_outgoing_data"),
        shape="httpcore's HTTP/2 connection",
        without="a request goes out in three writes",
        also={"_send_request_body": send_request_body},
    )


def installed() -> bool:
    return versions.replaced(
        http2.AsyncHTTP2Connection,
        {"_send_request_headers": send_request_headers, "_send_request_body": send_request_body},
    )
