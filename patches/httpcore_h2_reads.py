"""HTTP/2 response reads without a lock convoy (a fix applied to httpcore in the Pool).

httpcore multiplexes every stream of an origin on one HTTP/2 connection, and a stream
that wants its next event takes the connection's read lock and, if nothing is queued for
it, reads the socket. With N streams waiting, N-1 of them queue on that lock; the lock is
FIFO, and each holder ahead of a stream blocks on a read of its own before passing it on.
So an event that has already arrived for stream X sits in X's queue until every waiter
ahead of X has read once more: at 30 concurrent streams that is ~30 token arrivals, ~20 ms
of delay for each token (bench.trace: "sim first byte → hub publishes" 17 ms p50 at c=30
against 1.7 ms at c=1). The same defect is described in pydantic/httpx2#1133
(https://github.com/pydantic/httpx2/issues/1133).

Here one stream at a time is the *reader*; the others wait on a future of their own. After
each read the reader wakes exactly the waiters that now have events; when it leaves (its
own event came, it failed, or it was cancelled) it hands the role to one waiter that still
has nothing. Reads themselves still go through httpcore's `_receive_events` under its read
lock, so a flow-control wait (which reads with no stream id) stays mutually exclusive with
us. Only `_receive_stream_event` is replaced.

Installed by `patches.install_httpcore()` in the Pool process. Written for httpcore 1.0.x
(1.0.9) with h2 4.x; an optimisation, so on another httpcore, or one whose connection lacks
the attributes it relies on, it logs a warning and leaves httpcore as it is.
"""

from __future__ import annotations

import asyncio

import h2.events
from httpcore import RemoteProtocolError
from httpcore._async import http2

from patches import versions

LIBRARY, WRITTEN_FOR = "httpcore", "1.0."


class ReadBaton:
    """Who reads for an HTTP/2 connection, and who waits for what."""

    def __init__(self):
        self.reading = False
        self.reader: int | None = None  # the stream id reading now (for tests and debugging)
        self.waiters: dict[int, asyncio.Future] = {}

    async def wait(self, stream_id: int, events: dict) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[stream_id] = fut
        try:
            await fut
        except asyncio.CancelledError:
            if not self.reading:
                self.wake_next_reader(events)  # we may have been chosen: pass it on
            raise
        finally:
            if self.waiters.get(stream_id) is fut:
                del self.waiters[stream_id]

    def wake_ready(self, events: dict) -> None:
        for stream_id, fut in self.waiters.items():
            if events.get(stream_id) and not fut.done():
                fut.set_result(None)

    def wake_next_reader(self, events: dict) -> None:
        for stream_id, fut in self.waiters.items():
            if not events.get(stream_id) and not fut.done():
                fut.set_result(None)
                return


async def receive_stream_event(self, request, stream_id: int):
    """Replacement for `AsyncHTTP2Connection._receive_stream_event` (every event of every
    stream passes here: keep it lean)."""
    baton = self.__dict__.get("_sluice_baton")
    if baton is None:
        baton = self._sluice_baton = ReadBaton()
    while not self._events.get(stream_id):
        if baton.reading:
            await baton.wait(stream_id, self._events)
            continue
        baton.reading, baton.reader = True, stream_id
        try:
            while not self._events.get(stream_id):
                await self._receive_events(request, stream_id)
                baton.wake_ready(self._events)
        finally:
            baton.reading, baton.reader = False, None
            baton.wake_ready(self._events)
            baton.wake_next_reader(self._events)
    event = self._events[stream_id].pop(0)
    if isinstance(event, h2.events.StreamReset):
        raise RemoteProtocolError(event)
    return event


def install() -> bool:
    """Patch httpcore's async HTTP/2 connection; False (httpcore unchanged, one warning) if
    it is not the version and shape this was written against. Idempotent."""
    return versions.guarded_install(
        __name__,
        LIBRARY,
        WRITTEN_FOR,
        http2.AsyncHTTP2Connection,
        "_receive_stream_event",
        receive_stream_event,
        needs=("_receive_events", "_receive_stream_event", "_receive_response", "_receive_response_body"),
        shape="httpcore's HTTP/2 connection",
        without="reads keep their lock convoy",
    )


def installed() -> bool:
    return http2.AsyncHTTP2Connection._receive_stream_event is receive_stream_event
