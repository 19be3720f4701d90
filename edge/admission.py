"""One admitted client stream, from `Edge.admit` to its close: what every front end shares.

`Edge.admit` checks a request and joins its flight (edge/streams.py); what it returns is an
`Admission`, and everything a front end does with it is the same whatever the format:

    admission = await edge.admit(...)              # or a Rejection is raised
    async with admission.serving(scope, receive):  # watches the client and the shutdown;
        async for event in admission.events():     # on every exit: close()
            ...render event in this front end's format...

`events()` (and `batches(idle_s)`, the same events grouped as they become ready, with an
empty batch when `idle_s` passed without one: time for a keepalive) yields normalized
stream events: `started` (this client's TTFT, queue wait and who answered are then on
the admission), `delta`, `meta`, `usage`, and exactly one terminal `done` / `error`
(`shutting_down` when the gateway stops, `cancelled` when the client cancels); it ends
without a terminal when the client has gone. A follower without fan-out gets its deltas
held back and then in one delta before the terminal. Front ends only render.

Every event of the stream that this client gets carries its index in the stream as
`event[EVENT_ID]` (the flight's events are the stream's from the first, so the index is
the same for every client of a coalesced stream; SSE renders it as `id:`). A resumable
admission (`resumable`) whose client disconnects is parked by `Edge._release` rather than
released; `resume(after)` makes it serve again from the event after `after`, and the
front end's `app` serves it on the new connection (docs/architecture.md "Resumable streams").

`close()` is the one place a client's stream ends: it leaves the flight (the last local
client gives the edge's reference back), charges the client key its tokens and releases
its stream slot, and sends the request record to Metrics. It runs once, on every path,
from `serving`'s exit: a front end that fails mid-render still releases everything.

What the admission measures (issue 18), the same for every front end: the TTFT as the
client sees it, on the edge's clock, until the edge hands the first byte to its front end
(`started` is normalized in the same step as it is rendered and written); for a leader,
the provider's share of it (the Pool's `provider_ttft_ms`, on the Pool's clock: each is a
difference on one clock, so "added = client - provider" mixes no clocks); the queue wait,
the upstream attempts, who answered (`served`) and how the stream ended (`ending`: usage
and finish reason). `close()` hands them with the outcome to the request record and the
access log; `serving` wraps the stream in its trace (edge/tracing.py, off by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from edge import tracing
from edge.access_log import STREAM_OUTCOME
from edge.measures import DISCONNECTED, Measures
from edge.streams import Subscriber
from protocols import events as ev
from protocols import trace

EVENT_ID = "_id"  # an event's index in its stream, set on the (shared) event dict
_GONE = {"type": "_client_gone"}  # queued by the watcher when the client disconnects
_IDLE = {"type": "_idle"}  # queued by `_IdleTimer`: time for a keepalive


class _IdleTimer:
    """`batches(idle_s)`'s keepalive: puts `_IDLE` in the client's queue once the wait for
    the next events has lasted `idle_s`. One timer for the life of the stream, moved on
    only when it fires: an `asyncio.timeout` around each wait made and cancelled a timer per
    batch, i.e. per token (the edge's CPU at 20 streams −13 to −15 % without it;
    docs/architecture.md "What a token costs")."""

    EARLY_S = 0.002  # a timer may fire a hair before its time; a keepalive need not be exact

    def __init__(self, queue: asyncio.Queue, idle_s: float):
        self.queue, self.idle_s = queue, idle_s
        self.loop = asyncio.get_running_loop()
        self.since = self.loop.time()  # when the current wait started
        self.waiting = False  # the consumer is waiting on the queue (not writing)
        self.fired = False  # an _IDLE is (or was) in the queue, not yet taken
        self._handle = self.loop.call_at(self.since + idle_s, self._due)

    def wait_starts(self) -> None:
        self.since, self.waiting = self.loop.time(), True

    def _due(self) -> None:
        now = self.loop.time()
        due = self.since + self.idle_s
        if self.waiting and now >= due - self.EARLY_S:
            self.waiting, self.fired = False, True  # one keepalive per wait
            self.queue.put_nowait(_IDLE)
            due = now + self.idle_s
        elif due <= now:  # the consumer was busy writing: its next wait counts afresh
            due = now + self.idle_s
        self._handle = self.loop.call_at(due, self._due)

    def cancel(self) -> None:
        self._handle.cancel()


class Admission:
    """One client's admitted stream: its events, its measurements, its outcome, its end."""

    def __init__(
        self, sub: Subscriber, body: dict, shutting_down: asyncio.Event, release: Callable[[Admission, dict], None]
    ):
        self.sub = sub
        self.body = body  # what goes upstream (the key's token estimate counts its messages)
        self.shutting_down = shutting_down
        self._release = release  # the edge's bookkeeping (Edge._release), run once by close()
        self.admitted_at = time.time()  # made right after admission (Edge.admit): the trace's admission span
        # TTFT, queue wait, provider TTFT, attempts, who answered, the ending (edge/measures.py)
        self.measures = Measures(sub.received_at)
        # Until the stream says otherwise: a front end that fails or is cancelled before the
        # terminal event lost its client.
        self.outcome: dict = {"outcome": "error", "error_code": "disconnected"}
        self.closed = False
        self._held: list[str] = []
        self.next_id = 0  # the stream index of the next stream event in the client's queue
        self.parked = False  # disconnected and kept for a resume (Edge._release)
        self.app: Callable | None = None  # the ASGI app serving it: served again on a resume
        self.on_expiry: Callable[[], None] | None = None  # the front end's end, parked and never resumed

    # --- what it measured (edge/measures.py) -----------------------------------------------
    @property
    def ttft_ms(self) -> float | None:
        return self.measures.ttft_ms

    @property
    def first_byte_at(self) -> float | None:
        return self.measures.first_byte_at

    @property
    def queue_wait_ms(self) -> float | None:
        return self.measures.queue_wait_ms

    @property
    def provider_ttft_ms(self) -> float | None:
        return self.measures.provider_ttft_ms

    @property
    def attempts(self) -> int | None:
        return self.measures.attempts

    @property
    def served(self) -> dict:
        return self.measures.served

    @property
    def ending(self) -> dict:
        return self.measures.ending

    # --- who -------------------------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self.sub.request_id

    @property
    def role(self) -> str:
        return self.sub.role

    @property
    def provider(self) -> str:
        return self.sub.provider

    @property
    def model(self) -> str:
        return self.sub.model

    @property
    def resumable(self) -> bool:
        return self.sub.resumable

    @property
    def stream_id(self) -> str | None:
        """The upstream call this client listens to (shared by its coalesced peers)."""
        return self.sub.flight.stream_id if self.sub.flight else None

    def received(self) -> list[dict]:
        """Every event of the stream so far, the client's or not yet (the flight's)."""
        return self.sub.flight.events if self.sub.flight else []

    # --- the events ------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[dict]:
        """The normalized events one at a time (see the module docstring)."""
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self, idle_s: float | None = None) -> AsyncIterator[list[dict]]:
        """The normalized events, as many at once as are ready (one write for a front end
        that batches), `[]` after `idle_s` without one. Ends after the batch that holds the
        terminal event (`outcome` is then its outcome), or when the client has gone."""
        queue = self.sub.queue
        idle = _IdleTimer(queue, idle_s) if idle_s is not None else None
        try:
            while True:
                if idle is not None:
                    idle.wait_starts()
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                if idle is not None:
                    idle.waiting = False
                    if idle.fired:
                        idle.fired = False
                        items = [item for item in items if item is not _IDLE]
                        if not items:
                            yield []
                            continue
                if any(item is _GONE for item in items):
                    self.outcome = dict(DISCONNECTED)
                    return
                batch: list[dict] = []
                received = self.received()
                for event in items:
                    if self.next_id < len(received) and received[self.next_id] is event:
                        event[EVENT_ID] = self.next_id  # the same for every client of the stream
                        self.next_id += 1
                    self._normalize(event, batch)
                    trace.stamp("rendered", "edge", self.sub.request_id, event)
                    if ev.is_terminal(event):  # `outcome` is its outcome now (_normalize)
                        yield batch
                        return
                if batch:
                    yield batch
        finally:
            if idle is not None:
                idle.cancel()

    def _normalize(self, event: dict, batch: list[dict]) -> None:
        """Append what this client gets of `event` to `batch`."""
        kind = event.get("type")
        if kind == ev.STARTED:
            # TTFT as the client sees it: until this edge writes the first byte (the front
            # end renders and writes this batch next), on the edge's clock (a resumed
            # client's replay: measured the first time).
            self.measures.started(event, time.time(), leader=self.sub.role == "leader")
        elif kind == ev.DELTA and not self.sub.fanout:
            self._held.append(event["delta"])
            return
        elif ev.is_terminal(event):
            self.outcome = self.measures.terminal(event)
            if self._held:
                batch.append(ev.delta("".join(self._held)))
                self._held = []
        batch.append(event)

    def resume(self, after: int) -> None:
        """A parked client is back (Edge.resume): its stream goes on from the event after
        index `after` (its Last-Event-ID; -1: from the first), the live ones following,
        each once. The queue is rebuilt from the flight's events in one step of the loop:
        no live event can slip in between."""
        queue = self.sub.queue
        while not queue.empty():
            queue.get_nowait()
        self.sub.push(self.received()[after + 1 :])
        self.next_id = after + 1
        self._held = []
        self.parked = self.closed = False
        self.outcome = {"outcome": "error", "error_code": "disconnected"}

    # --- the client's side -----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def serving(self, scope, receive) -> AsyncIterator[Admission]:
        """An HTTP front end's frame around its rendering. Inside, the client going away
        (`http.disconnect` from `receive`, awaited, not polled) and the gateway shutting down
        (the client then gets an error event, never a cut connection) arrive as items of the
        client's own queue, so the events loop awaits one queue only: one watcher task for
        the life of the stream, not one per event. A broken socket while writing (OSError)
        ends the stream as the client's disconnect. On every exit: `close()`, the outcome
        and the measurements are left in the request's scope for the access log
        (edge/access_log.py), and the request's trace ends (edge/tracing.py)."""
        watcher = asyncio.ensure_future(self._watch(receive))
        traced = tracing.begin(self.sub, self.admitted_at)  # None unless tracing is on
        try:
            yield self
        except OSError:  # the client's socket broke while we wrote
            self.outcome = dict(DISCONNECTED)
        finally:
            watcher.cancel()
            scope.setdefault("state", {})[STREAM_OUTCOME] = self.close()
            if traced is not None:
                traced.end(self.outcome, self, time.time())

    async def _watch(self, receive) -> None:
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        shutdown = asyncio.ensure_future(self.shutting_down.wait())
        try:
            done, _ = await asyncio.wait({disconnect, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if disconnect in done:
                self.sub.queue.put_nowait(_GONE)
            else:
                self.sub.queue.put_nowait(ev.error("shutting_down", "the gateway is shutting down"))
        finally:
            disconnect.cancel()
            shutdown.cancel()

    def close(self, outcome: dict | None = None) -> dict:
        """The client's stream has ended (with `outcome` when the front end knows better than
        the stream, e.g. its write failed): release everything once. Returns the outcome with
        this client's measurements, as recorded: TTFT, queue wait, the provider's TTFT (a
        leader's), and the provider and model that answered (a fallback's labels the request)."""
        if outcome is not None:
            self.outcome = outcome
        ended = self.measures.ended(self.outcome, self.sub.provider, self.sub.model)
        if not self.closed:
            self.closed = True
            self._release(self, ended)
        return ended


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] in ("http.disconnect", "websocket.disconnect"):
            return
