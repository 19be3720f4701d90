"""One client's SSE response: ping first, then meta, deltas and exactly one terminal event.

A raw ASGI response rather than Starlette's StreamingResponse, because it must react to
whichever comes first: the next event of the stream, the client going away
(`http.disconnect` from `receive`, awaited, not polled), the keepalive timer (a ping
while nothing else happens), and the gateway shutting down (the client then gets an
error event, never a connection cut mid-stream). A watcher turns the disconnect and the
shutdown into items of the client's queue, so the pump awaits one thing at a time.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from edge import tracing
from edge.access_log import STREAM_OUTCOME
from edge.streams import Subscriber
from protocols import events as ev
from protocols import trace
from protocols.sse import PING, frame

_FRAME = "_sse_frame"  # where SluiceRenderer caches an event's encoded frame
_GONE = {"type": "_client_gone"}  # queued by the watcher when the client disconnects

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Renderer:
    """Turns a stream's events into one client's bytes. Subclasses pick the wire format;
    this base measures TTFT and queue wait, and holds deltas back for a follower without
    fan-out (it gets the whole answer in one delta at the end)."""

    def __init__(self, sub: Subscriber):
        self.sub = sub
        self.ttft_ms: float | None = None
        self.queue_wait_ms: float | None = None
        self.provider_ttft_ms: float | None = None  # the leader's only: its call's provider TTFT
        self.first_byte_at: float | None = None  # when this edge wrote the first byte (edge clock)
        self.ending: dict = {}  # the terminal event's usage / finish reason (traces)
        self.attempts: int | None = None
        self.served: dict = {}  # who answered: provider, model, key, fallback_from (from the Pool)
        self._held: list[str] = []

    def opening(self) -> bytes:
        return PING

    def keepalive(self) -> bytes:
        return PING

    def render(self, event: dict) -> bytes:
        kind = event.get("type")
        if kind == ev.STARTED:
            # TTFT as the client sees it: until this edge writes the first byte, on the
            # edge's clock (a follower that joined after the first byte waits for the
            # replay only). The provider's share is measured on the Pool's clock; each is
            # a difference on one clock, so "added = client - provider" mixes no clocks.
            self.first_byte_at = time.time()
            self.ttft_ms = round((self.first_byte_at - self.sub.received_at) * 1000.0, 3)
            self.queue_wait_ms = event.get("queue_wait_ms")
            if self.sub.role == "leader":  # a follower did not wait for the provider's whole TTFT
                self.provider_ttft_ms = event.get("provider_ttft_ms")
            self.attempts = event.get("attempts")
            self.served = {k: event[k] for k in ("provider", "model", "key", "fallback_from") if event.get(k)}
            return self.started()
        if kind == ev.DELTA and not self.sub.fanout:
            self._held.append(event["delta"])
            return b""
        out = b""
        if ev.is_terminal(event):
            self.ending = {k: event.get(k) for k in ("usage", "finish_reason") if event.get(k) is not None}
        if ev.is_terminal(event) and self._held:
            out += self.event(ev.delta("".join(self._held)))
            self._held.clear()
        return out + self.event(event)

    def started(self) -> bytes:
        return b""

    def event(self, event: dict) -> bytes:
        raise NotImplementedError


class SluiceRenderer(Renderer):
    """sluice's own format: meta, delta, usage, done / error as `data:` JSON frames."""

    def started(self) -> bytes:
        return frame(
            {
                "type": "meta",
                "request_id": self.sub.request_id,
                # The upstream call this client listens to (shared by its coalesced peers);
                # what an operator finds in the Pool's open_calls. Not a capability: the
                # hub serves a stream only on the Coalescer's ticket (docs/security.md).
                "stream_id": self.sub.flight.stream_id if self.sub.flight else None,
                "role": self.sub.role,
                # Who answered: the request's provider and model, or the fallback's (then
                # fallback_from names the one asked for), and the key "#n" of an account
                # with several keys.
                "provider": self.sub.provider,
                "model": self.sub.model,
                **self.served,
                "ttft_ms": self.ttft_ms,
                "queue_wait_ms": self.queue_wait_ms,
                "attempts": self.attempts,  # upstream calls it took (retries before the first byte)
            }
        )

    def event(self, event: dict) -> bytes:
        # Every client of a stream gets the same event dict (edge/streams.py), so its
        # frame is encoded once and kept on the event: a burst of 1,000 followers costs
        # one json.dumps per delta, not 1,000.
        data = event.get(_FRAME)
        if data is None:
            data = event[_FRAME] = frame(event)
        return data


class SSEStream:
    def __init__(
        self,
        sub: Subscriber,
        keepalive_s: float,
        shutting_down: asyncio.Event,
        on_end: Callable[[Subscriber, dict], None],
        renderer: Renderer | None = None,
        before_terminal: Callable[[Subscriber, dict], Awaitable[None]] | None = None,
    ):
        self.sub, self.keepalive_s, self.shutting_down, self.on_end = sub, keepalive_s, shutting_down, on_end
        self.renderer = renderer or SluiceRenderer(sub)
        self.before_terminal = before_terminal  # e.g. store the reply before the client hears "done"
        self.admitted_at = time.time()  # made right after admission (edge/app.py)

    async def __call__(self, scope, receive, send) -> None:
        headers = HEADERS + [(b"x-request-id", self.sub.request_id.encode())]
        outcome = {"outcome": "error", "error_code": "disconnected"}
        # One watcher for the life of the stream turns "the client left" and "the gateway
        # stops" into items of the client's own queue, so the pump awaits one queue only:
        # no task and no asyncio.wait per event.
        watcher = asyncio.ensure_future(self._watch(receive))
        traced = tracing.begin(self.sub, self.admitted_at)  # None unless tracing is on
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.renderer.opening(), "more_body": True})
            outcome = await self._pump(send)
        except OSError:  # the client's socket broke while we wrote
            outcome = {"outcome": "cancelled", "error_code": "disconnected"}
        finally:
            watcher.cancel()
            r = self.renderer
            measured = {"ttft_ms": r.ttft_ms, "queue_wait_ms": r.queue_wait_ms, "provider_ttft_ms": r.provider_ttft_ms,
                        # who answered (a fallback's provider and model) labels the request
                        "provider": r.served.get("provider", self.sub.provider),
                        "model": r.served.get("model", self.sub.model)}
            scope.setdefault("state", {})[STREAM_OUTCOME] = {**outcome, **measured}  # for the access log
            self.on_end(self.sub, {**outcome, **measured})
            if traced is not None:
                traced.end(outcome, r, time.time())

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

    async def _pump(self, send) -> dict:
        queue = self.sub.queue
        while True:
            try:
                async with asyncio.timeout(self.keepalive_s):
                    events = [await queue.get()]
            except TimeoutError:
                await send({"type": "http.response.body", "body": self.renderer.keepalive(), "more_body": True})
                continue
            while not queue.empty():  # whatever else is ready goes out in the same write
                events.append(queue.get_nowait())
            if any(event is _GONE for event in events):
                return {"outcome": "cancelled", "error_code": "disconnected"}
            body, terminal = b"", None
            for event in events:
                body += self.renderer.render(event)
                trace.stamp("rendered", "edge", self.sub.request_id, event)
                if ev.is_terminal(event):
                    terminal = event
                    break
            if terminal and self.before_terminal is not None:
                await self.before_terminal(self.sub, terminal)
            if body or terminal:
                await send({"type": "http.response.body", "body": body, "more_body": terminal is None})
            if terminal:
                return _outcome_of(terminal)


def _outcome_of(event: dict) -> dict:
    if event["type"] == ev.DONE:
        return {"outcome": "done", "error_code": None}
    code = event.get("code")
    return {"outcome": "cancelled" if code == "cancelled" else "error", "error_code": code}


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
