"""One upstream call: send the provider request, feed the bytes to the adapter, publish.

`run_call` owns the response from the first byte to the last and closes it on every path.
TTFT is stamped at the first provider byte. A failure before that byte is not published:
it comes back as `CallResult.failure` for the Pool to retry (actors/retry_policy.py), or
to publish when it gives up; from the first byte on, errors go out in-band as before. Aborting (task cancellation) resets the
HTTP/2 stream before closing it: httpcore closes an unfinished HTTP/2 response without
telling the server (encode/httpcore#944 was declined), so without the RST_STREAM the
provider would keep generating, and billing, until its flow-control window filled up
(patches/httpcore_rst_stream.py sends it).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import h2.errors
import h2.events
import httpcore

from actors.pool_logic import CANCELLED
from actors.retry_policy import CONNECT, RESET, TIMEOUT, Failure, failure_of_status
from patches import httpcore_rst_stream
from protocols import events as ev
from protocols.providers.base import header, message_from_body

MAX_ERROR_BODY = 64 * 1024
# A chat call asks for a stream (SSE, or NDJSON for Ollama). A 200 with one of these types
# is a failure's page under the wrong status -- a provider's error JSON, a CDN's or a
# proxy's HTML page -- and is handled as the 502 it stands for: nothing of it is published,
# the provider's message is kept, and it is retried like a 5xx before the first byte.
NOT_A_STREAM = ("application/json", "text/html")
NOT_A_STREAM_STATUS = 502


@dataclass
class CallResult:
    outcome: str  # "done" | "error" | "cancelled"
    error: dict | None = None
    retry_after_s: float | None = None
    sent_at: float = 0.0
    first_byte_at: float | None = None
    ended_at: float = 0.0
    failure: Failure | None = None  # failed before the first byte, in a way a retry may fix
    attempts: int = 1  # set by the Pool: which attempt this was
    first_sent_at: float | None = None  # set by the Pool: when its first attempt went out
    key: int = 0  # set by the Pool: the account's API key (index) this attempt used
    key_results: list | None = None  # set by the Pool: [[key, ok]] for the Pacer's circuits
    usage: dict | None = None  # the provider's usage report, if it sent one (token counters)

    @property
    def delivered(self) -> bool:
        """Did any of this call reach the hub (then it must never be retried)?"""
        return self.first_byte_at is not None


async def run_call(
    http: httpcore.AsyncConnectionPool,
    adapter,
    request: tuple[str, str, list, bytes],
    publish: Callable[[list[dict]], None],
    queue_wait_ms: float,
    timeouts: dict,
    attempt: int = 1,
    served: dict | None = None,
    first_sent_at: float | None = None,
    max_duration_s: float | None = None,
) -> CallResult:
    """One attempt. Errors before the first byte are returned, not published (the caller
    retries or publishes `result.error`); a cancellation is always published. `served`
    (provider, model, key, fallback_from) goes into the stream's `started` event, with the
    provider's TTFT counted from `first_sent_at` (the first attempt; this one's by default).
    `max_duration_s` (UPSTREAM_MAX_DURATION_S; None or 0: no bound) bounds the attempt from
    asking for a connection to its last byte: past it the call is aborted (the stream reset)
    and ends as a timeout."""
    method, url, headers, body = request
    result = CallResult("error", sent_at=time.time())
    bound = asyncio.timeout(max_duration_s or None)
    try:
        async with (
            bound,
            http.stream(method, url, headers=headers, content=body, extensions={"timeout": timeouts}) as response,
        ):
            try:
                streamed = response.status == 200 and adapter.Parser.STREAMED
                page = _not_a_stream(response.headers) if streamed else None
                if response.status != 200 or page:
                    data = await _read_bounded(response)
                    status = NOT_A_STREAM_STATUS if page else response.status
                    result.error = adapter.error_from_response(status, response.headers, data)
                    if page:
                        said = message_from_body(data)
                        result.error["message"] = f"the provider answered 200 with {page}, not a stream" + (
                            f": {said}" if said else ""
                        )
                    result.retry_after_s = result.error.pop("retry_after_s", None)
                    result.failure = failure_of_status(status, result.retry_after_s)
                else:
                    await _stream_body(
                        response,
                        adapter.Parser(),
                        publish,
                        result,
                        queue_wait_ms,
                        attempt,
                        served,
                        first_sent_at or result.sent_at,
                        timeouts.get("read"),
                    )
                # The answer is whole: closing the response must not run into the bound
                # (that turned a delivered answer into an error after its `done`).
                bound.reschedule(None)
            except (asyncio.CancelledError, httpcore.ReadTimeout):
                # Whoever gave up on it, the provider must stop generating: reset the stream.
                await httpcore_rst_stream.reset(response)
                raise
    except asyncio.CancelledError:
        result.outcome, result.error = "cancelled", ev.error("cancelled", CANCELLED)
        publish([result.error])
        result.ended_at = time.time()
        raise
    except Exception as exc:  # any transport failure ends the stream with an in-band error
        # asyncio's TimeoutError from our own bound (httpcore raises its own timeout types)
        overran = isinstance(exc, TimeoutError) and bound.expired()
        why = _overran(max_duration_s) if overran else _classify(exc)
        result.outcome, result.error = "error", ev.error(*why)
        if result.delivered:
            publish([result.error])
        else:
            # Before the first byte it is a stall like a read timeout's: the retry policy decides.
            result.failure = Failure(TIMEOUT) if overran else failure_of_exception(exc)
    result.ended_at = time.time()
    return result


async def _stream_body(
    response,
    parser,
    publish,
    result: CallResult,
    queue_wait_ms: float,
    attempt: int,
    served: dict | None = None,
    first_sent_at: float | None = None,
    read_timeout_s: float | None = None,
) -> None:
    """Publish the body's events as they come. The read timeout bounds silence; bytes
    that are no frame (SSE comments, empty lines: keepalives) must not reset it, so for a
    streamed answer the same timeout also bounds the time between two frames, or between
    two pieces of a long frame still arriving: a provider that sends only keepalives is
    timed out like one that sends nothing."""
    ending = _Ending()
    progress_at, frames, pending = time.monotonic(), 0, 0
    limit = read_timeout_s if parser.STREAMED else None
    async for chunk in response.aiter_stream():
        if result.first_byte_at is None:
            result.first_byte_at = time.time()
            provider_ttft_ms = (result.first_byte_at - (first_sent_at or result.sent_at)) * 1000.0
            publish(
                [
                    ev.started(
                        result.first_byte_at,
                        queue_wait_ms,
                        attempt,
                        provider_ttft_ms=provider_ttft_ms,
                        **(served or {}),
                    )
                ]
            )
        events = parser.feed(chunk)
        now = time.monotonic()  # once a chunk: this is the token path
        if parser.frames != frames or parser.pending_size > pending:
            progress_at, frames = now, parser.frames
        elif limit is not None and now - progress_at > limit:
            raise httpcore.ReadTimeout(f"nothing but keepalives from the provider for {limit:g} s")
        pending = parser.pending_size
        if ending.take(events, publish):
            break
    else:
        if result.first_byte_at is None:  # a 200 with an empty body: broken off, nothing delivered
            raise httpcore.RemoteProtocolError("the provider sent no body")
        ending.take(parser.close(), publish)
    result.usage = ending.usage
    if ending.error is not None:
        result.error = ending.error
        publish([ending.error])
        return
    result.outcome = "done"
    publish([ev.done(ending.finish_reason or "stop", ending.usage)])


class _Ending:
    """What the adapter said about the end so far: finish reason, usage, or an error."""

    def __init__(self):
        self.finish_reason, self.usage, self.error = None, None, None

    def take(self, events: list[dict], publish) -> bool:
        """Publish the ordinary events; True once the stream ended in an error."""
        out, ended = _translate(events)
        for event in out:
            if event["type"] == ev.USAGE:
                self.usage = event["usage"]
        if out:
            publish(out)
        if ended is not None and ended["type"] == ev.ERROR:
            self.error = ended
            return True
        if ended is not None:
            self.finish_reason = ended["reason"]
        return False


def _translate(events: list[dict]) -> tuple[list[dict], dict | None]:
    """Split adapter events into those to publish now and the finish/error, if any."""
    out, ended = [], None
    for event in events:
        if event["type"] in (ev.FINISH, ev.ERROR):
            if ended is None or event["type"] == ev.ERROR:
                ended = event
        else:
            out.append(event)
    return out, ended


def _not_a_stream(headers) -> str | None:
    """The media type of a 200 that cannot be the stream asked for (NOT_A_STREAM), else None."""
    value = header(headers, b"content-type") or b""
    kind = value.split(b";")[0].strip().lower().decode("latin-1")
    return kind if kind in NOT_A_STREAM else None


async def _read_bounded(response) -> bytes:
    data = b""
    async for chunk in response.aiter_stream():
        data += chunk
        if len(data) > MAX_ERROR_BODY:
            break
    return data[:MAX_ERROR_BODY]


def _what(exc: Exception) -> str:
    """The exception's text, or its type and the one it was mapped from when it has none
    (httpcore's ReadError from anyio's EndOfStream, the peer's close, or ClosedResourceError,
    a socket closed on our side, both carry no text)."""
    if str(exc):
        return str(exc)
    cause = exc.__cause__ or exc.__context__
    return type(exc).__name__ + (f" ({type(cause).__name__})" if cause is not None else "")


def _overran(max_duration_s: float | None) -> tuple[str, str]:
    return "upstream_timeout", f"the call exceeded UPSTREAM_MAX_DURATION_S ({max_duration_s:g} s)"


def _classify(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, (httpcore.ConnectError, httpcore.ConnectTimeout)):
        return "upstream_connect", f"could not connect to the provider: {type(exc).__name__}"
    if isinstance(exc, (httpcore.ReadTimeout, httpcore.WriteTimeout, httpcore.PoolTimeout)):
        return "upstream_timeout", f"the provider did not answer in time: {type(exc).__name__}"
    if isinstance(exc, (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)):
        return "upstream_reset", f"the provider broke the stream off: {_what(exc)}"
    if isinstance(exc, httpcore.LocalProtocolError):  # e.g. an answer on a connection h2 had closed
        return "upstream_reset", f"the connection was closed under the call: {_what(exc)}"
    if escaped_the_http_library(exc):
        return "upstream_reset", f"the connection broke: {type(exc).__name__}: {exc}"
    return "upstream_error", f"{type(exc).__name__}: {exc}"


_HTTP_LIBRARY = tuple(f"{os.sep}{name}{os.sep}" for name in ("httpcore", "anyio", "h2"))


def escaped_the_http_library(exc: BaseException) -> bool:
    """An exception httpcore did not map to its own (e.g. a connection the provider reset
    the moment it was accepted: under uvloop, anyio reads the peer name of a socket that is
    gone and raises AttributeError or ValueError "negative file descriptor"). It is a broken
    connection when it was raised inside the HTTP library, not in our code."""
    if type(exc).__module__.split(".")[0] == "httpcore":
        return False  # httpcore's own exceptions are classified by their type
    tb = exc.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename for part in _HTTP_LIBRARY):
            return True
        tb = tb.tb_next
    return False


def failure_of_exception(exc: Exception) -> Failure | None:
    """A transport failure before the first byte, as a retry sees it."""
    if isinstance(exc, (httpcore.ConnectError, httpcore.ConnectTimeout)):
        return Failure(CONNECT, unprocessed=True)  # nothing reached the provider
    if isinstance(exc, (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)):
        return Failure(RESET, unprocessed=_refused(exc))
    if isinstance(exc, httpcore.LocalProtocolError):
        # Seen under load: a 500's headers arriving on an HTTP/2 connection h2 had already
        # closed ("RECV_HEADERS in state CLOSED"). A broken connection, not a bad request.
        return Failure(RESET)
    if escaped_the_http_library(exc):
        return Failure(RESET)  # a connection broken in a way httpcore did not map
    if isinstance(exc, httpcore.ReadTimeout):
        # Silence past the read timeout: the provider may still be working on it, so a
        # tools request is not sent again (not `unprocessed`); the deadline bounds the rest.
        return Failure(TIMEOUT)
    return None  # write / pool timeouts: the request may be half sent; let the client decide


def _refused(exc: Exception) -> bool:
    """RST_STREAM(REFUSED_STREAM): the server says it did not process the request (RFC 9113
    8.7). An h2 event travels as the exception's argument (see patches/httpcore_h2_reads.py)."""
    event = exc.args[0] if exc.args else None
    return isinstance(event, h2.events.StreamReset) and event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
