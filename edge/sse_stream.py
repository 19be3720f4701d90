"""One client's SSE response: the transport every streaming front end shares.

A raw ASGI response rather than Starlette's StreamingResponse, because it must react to
whichever comes first: the next events of the stream, the client going away, the
keepalive timer (a ping while nothing else happens), and the gateway shutting down (the
client then gets an error event, never a connection cut mid-stream). The admission
(edge/admission.py) turns the first two and the last into its events; this module
writes them: the opening ping at once, then the events ready at the same moment in one
write, through a `Renderer` that picks the wire format (sluice's own here; OpenAI's
chunks in edge/openai_compat.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from edge.admission import EVENT_ID, Admission
from protocols import events as ev
from protocols.sse import PING, frame

_FRAME = "_sse_frame"  # where SluiceRenderer caches an event's encoded frame

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Renderer:
    """Turns one admission's normalized events into its client's bytes. Subclasses pick
    the wire format: `started` (the first provider byte: the admission's TTFT, queue wait
    and who answered are known) and `event` (every other event)."""

    def __init__(self, admission: Admission):
        self.admission = admission

    def opening(self) -> bytes:
        return PING

    def keepalive(self) -> bytes:
        return PING

    def render(self, event: dict) -> bytes:
        return self.started() if event.get("type") == ev.STARTED else self.event(event)

    def started(self) -> bytes:
        return b""

    def event(self, event: dict) -> bytes:
        raise NotImplementedError


def id_line(event: dict) -> bytes:
    """`id: <n>` for an event of the stream (its index: the same for every client, and what
    a resume's Last-Event-ID names); nothing for the edge's own (a client's cancel)."""
    n = event.get(EVENT_ID)
    return b"" if n is None else b"id: %d\n" % n


class SluiceRenderer(Renderer):
    """sluice's own format: meta, delta, usage, done / error as `data:` JSON frames, each
    with its `id:` (edge/admission.py EVENT_ID)."""

    def render(self, event: dict) -> bytes:
        if event.get("type") == ev.STARTED:
            return id_line(event) + self.started()
        return self.event(event)

    def started(self) -> bytes:
        a = self.admission
        return frame(
            {
                "type": "meta",
                "request_id": a.request_id,
                # The upstream call this client listens to (shared by its coalesced peers);
                # what an operator finds in the Pool's open_calls. Not a capability: the
                # hub serves a stream only on the Coalescer's ticket (docs/security.md).
                "stream_id": a.stream_id,
                "role": a.role,
                # Who answered: the request's provider and model, or the fallback's (then
                # fallback_from names the one asked for), and the key "#n" of an account
                # with several keys.
                "provider": a.provider,
                "model": a.model,
                **a.served,
                "ttft_ms": a.ttft_ms,
                "queue_wait_ms": a.queue_wait_ms,
                "attempts": a.attempts,  # upstream calls it took (retries before the first byte)
            }
        )

    def event(self, event: dict) -> bytes:
        # Every client of a stream gets the same event dict (edge/streams.py), so its
        # frame is encoded once and kept on the event: a burst of 1,000 followers costs
        # one json.dumps per delta, not 1,000.
        data = event.get(_FRAME)
        if data is None:
            payload = {k: v for k, v in event.items() if k != EVENT_ID} if EVENT_ID in event else event
            data = event[_FRAME] = id_line(event) + frame(payload)
        return data


class SSEStream:
    """The SSE response for one admission. `before_terminal(event)` is awaited before the
    terminal event is written (a thread stores its reply before the client hears "done")."""

    def __init__(
        self,
        admission: Admission,
        keepalive_s: float,
        renderer: Renderer | None = None,
        before_terminal: Callable[[dict], Awaitable[None]] | None = None,
    ):
        self.admission, self.keepalive_s = admission, keepalive_s
        self.renderer = renderer or SluiceRenderer(admission)
        self.before_terminal = before_terminal

    async def __call__(self, scope, receive, send) -> None:
        headers = HEADERS + [(b"x-request-id", self.admission.request_id.encode())]
        async with self.admission.serving(scope, receive):
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.renderer.opening(), "more_body": True})
            await self._pump(send)

    async def _pump(self, send) -> None:
        render = self.renderer.render
        async for batch in self.admission.batches(self.keepalive_s):
            if not batch:
                await send({"type": "http.response.body", "body": self.renderer.keepalive(), "more_body": True})
                continue
            body = b"".join([render(event) for event in batch])
            terminal = batch[-1] if ev.is_terminal(batch[-1]) else None
            if terminal is not None and self.before_terminal is not None:
                await self.before_terminal(terminal)
            if body or terminal is not None:
                await send({"type": "http.response.body", "body": body, "more_body": terminal is None})
