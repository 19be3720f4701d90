"""Edge-local coalescing and fan-out: one hub subscription per stream, many clients.

The first request for a key on this edge process asks the Coalescer (one `Submit`);
identical requests arriving meanwhile wait for that same answer, and later ones join the
local flight directly, so a burst of N identical requests costs O(1) actor messages. Each
flight keeps the events it received, so a client that joins late gets the replay first,
then the live events: every client of a stream sees the same events.

A client leaving never disturbs the others; when the last client of an unfinished
flight leaves, the edge drops its hub subscription and sends one `Cancel`, which is
this edge's single reference at the Coalescer.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.bridge import ActorBridge, BridgeError
from edge.dataplane import HubClient
from edge.listeners import new_events
from edge.rejections import Rejection
from protocols import events as ev
from protocols import messages as m
from protocols import trace
from protocols.keys import shard_of

log = logging.getLogger("sluice.edge.streams")


@dataclass(eq=False)
class Subscriber:
    """One client's view of a flight."""

    request_id: str
    role: str
    received_at: float
    provider: str
    model: str
    fanout: bool = True
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    flight: Flight | None = None
    outcome: str | None = None
    key_id: str | None = None  # the API key that owns this request (None: open access)

    def push(self, events: list[dict]) -> None:
        for event in events:
            self.queue.put_nowait(event)

    def cancel(self, code: str = "cancelled", message: str = "cancelled by the client") -> None:
        self.queue.put_nowait(ev.error(code, message))


@dataclass(eq=False)
class Flight:
    """This edge's view of one upstream stream, from the moment its first client asked.

    Clients are registered at once, before the Coalescer has answered, so a client that
    gives up while the flight is being admitted is simply removed; `admitted` resolves
    (or fails with a Rejection) for everyone together.
    """

    key: str
    shard: str
    submitter: str  # request id whose Submit created the flight
    admitted: asyncio.Future
    stream_id: str | None = None
    submitter_role: str = "leader"
    fanout: bool = True
    events: list = field(default_factory=list)
    subscribers: set = field(default_factory=set)
    finished: bool = False
    on_frame: Callable | None = None  # this flight's hub listener, while subscribed


class LocalStreams:
    def __init__(self, bridge: ActorBridge, hub: HubClient, edge_id: str, shards: int):
        self.bridge, self.hub, self.edge_id, self.shards = bridge, hub, edge_id, shards
        self.by_key: dict[str, Flight] = {}
        self.by_request: dict[str, Subscriber] = {}
        self.coalesce_enabled = True  # as the Coalescer last said (Admitted.coalesce)
        self.idle = asyncio.Event()  # set while no client is open (a drain waits on it)
        self.idle.set()
        self._tasks: set[asyncio.Task] = set()

    async def join(self, request_id: str, provider: str, model: str, body: dict, key: str, received_at: float) -> Subscriber:
        """Attach a new client to the flight for `key`; raises Rejection."""
        trace.stamp("edge_join", "edge", request_id)
        flight = self.by_key.get(key) if key and self.coalesce_enabled else None
        if flight is None or flight.finished:
            shard = f"coalescer:{shard_of(key, self.shards, request_id)}"
            flight = Flight(key, shard, request_id, asyncio.get_running_loop().create_future())
            if key:
                self.by_key[key] = flight
            self.spawn(self._submit(flight, m.Submit(request_id, key, provider, model, body, self.edge_id, received_at)))
        sub = Subscriber(request_id, "follower", received_at, provider, model)
        sub.flight = flight
        flight.subscribers.add(sub)
        self.by_request[request_id] = sub
        self.idle.clear()
        sub.push(list(flight.events))  # the replay; what comes later arrives live
        try:
            await asyncio.shield(flight.admitted)
        except BaseException:  # refused, or this client gave up while waiting
            self.leave(sub)
            raise
        if request_id == flight.submitter:
            sub.role = flight.submitter_role
        sub.fanout = flight.fanout or sub.role == "leader"
        return sub

    async def _submit(self, flight: Flight, submit: m.Submit) -> None:
        """Ask the Coalescer; resolve `flight.admitted` for every registered client, on
        every path: a failure here must never leave clients waiting on a dead flight."""
        try:
            await self._ask_coalescer(flight, submit)
        except Exception:
            log.exception("submitting request %s failed", submit.request_id)
            if flight.admitted.done():
                return
            if flight.stream_id is not None:
                self._abandon(flight)
            self._refuse(flight, m.Rejected(submit.request_id, 500, "internal_error", "the gateway failed to submit this request; it has been logged"))

    async def _ask_coalescer(self, flight: Flight, submit: m.Submit) -> None:
        try:
            reply = await self.bridge.ask(flight.shard, submit, timeout=10.0)
        except BridgeError as exc:
            if exc.code == "unencodable":  # edge/body_limits.py should have refused it
                log.error("request %s not submitted: %s", submit.request_id, exc)
                reply = m.Rejected(submit.request_id, 422, "invalid_request", f"the request cannot be forwarded: {exc}")
            else:
                reply = m.Rejected(submit.request_id, 503, "gateway_unavailable", f"the coalescer did not answer: {exc}")
        if isinstance(reply, m.Admitted):
            self.coalesce_enabled = reply.coalesce
            flight.stream_id, flight.submitter_role, flight.fanout = reply.stream_id, reply.role, reply.fanout
            if not reply.coalesce:
                self._unlist(flight)  # nobody else may join it
            if reply.error is not None:  # a failure still within its error TTL: replay it
                self._on_events(flight, [reply.error])
            elif not flight.subscribers:  # everyone left while we asked: give the reference back
                self._abandon(flight)
            else:
                try:
                    flight.on_frame = lambda seq, events: self._on_frame(flight, seq, events)
                    await self.hub.subscribe(flight.stream_id, reply.ticket, flight.on_frame)
                except OSError as exc:
                    self._abandon(flight)
                    reply = m.Rejected(submit.request_id, 503, "gateway_unavailable", f"stream hub unreachable: {exc}")
        if isinstance(reply, m.Admitted):
            flight.admitted.set_result(None)
            return
        if not isinstance(reply, m.Rejected):
            reply = m.Rejected(submit.request_id, 503, "gateway_unavailable", f"unexpected answer {type(reply).__name__}")
        self._refuse(flight, reply)

    def _refuse(self, flight: Flight, reply: m.Rejected) -> None:
        self._unlist(flight)
        flight.finished = True
        flight.admitted.set_exception(Rejection(reply.status, reply.code, reply.message, reply.retry_after_s))
        flight.admitted.exception()  # every waiting client re-raises it; mark it retrieved

    def _on_frame(self, flight: Flight, seq: int | None, events: list[dict]) -> None:
        """A hub frame: keep only events this flight does not have yet. A frame that
        starts beyond what we have belongs to an earlier subscription of this edge to
        the same stream; the replay that answers our subscription brings its events."""
        if seq is None:
            self._hub_lost(flight, events)
            return
        events = new_events(len(flight.events), seq, events)
        if events:
            self._on_events(flight, events)

    def _on_events(self, flight: Flight, events: list[dict]) -> None:
        if flight.finished:
            return
        flight.events.extend(events)
        for sub in flight.subscribers:
            sub.push(events)
        if any(ev.is_terminal(e) for e in events):
            flight.finished = True
            self._unlist(flight)
            self._unsubscribe(flight)

    def _hub_lost(self, flight: Flight, events: list[dict]) -> None:
        """The hub connection dropped (the Pool died, or the link did): the clients get
        the error event, and this edge gives its reference back (one Cancel), so that a
        flight nobody here can hear any more is not held open in our name."""
        if flight.finished:
            return
        self._on_events(flight, events)
        self.spawn(self.bridge.tell(flight.shard, m.Cancel(flight.stream_id, self.edge_id, time.time())))

    def stray_answer(self, shard: str, answer) -> None:
        """A second answer to a Submit (asked again of a replaced shard, edge/bridge.py):
        an `Admitted` holds a reference at the shard that sent it; give it back. One that
        replays a remembered error holds none (and a Cancel would take another's)."""
        if isinstance(answer, m.Admitted) and answer.error is None:
            self.spawn(self.bridge.tell(shard, m.Cancel(answer.stream_id, self.edge_id, time.time())))

    def leave(self, sub: Subscriber) -> None:
        """A client is gone (finished, disconnected, cancelled or refused)."""
        self.by_request.pop(sub.request_id, None)
        if not self.by_request:
            self.idle.set()
        flight = sub.flight
        if flight is None or sub not in flight.subscribers:
            return
        flight.subscribers.discard(sub)
        if flight.subscribers or flight.finished:
            return
        self._unlist(flight)  # a new identical request starts a new flight
        if flight.stream_id is not None:
            self._abandon(flight)
        # else: still being admitted; _submit gives the reference back when it is

    def _abandon(self, flight: Flight) -> None:
        """Drop this edge's reference: one Cancel, the hub subscription gone."""
        flight.finished = True
        self._unlist(flight)
        self._unsubscribe(flight)
        self.spawn(self.bridge.tell(flight.shard, m.Cancel(flight.stream_id, self.edge_id, time.time())))

    def _unsubscribe(self, flight: Flight) -> None:
        if flight.on_frame is not None:
            self.hub.unsubscribe(flight.stream_id, flight.on_frame)
            flight.on_frame = None

    def _unlist(self, flight: Flight) -> None:
        if self.by_key.get(flight.key) is flight:
            del self.by_key[flight.key]

    def cancel(self, request_id: str, key_id: str | None = None) -> bool:
        """Cancel one client's request; only its own key may (False otherwise, as unknown)."""
        sub = self.by_request.get(request_id)
        if sub is None or sub.key_id != key_id:
            return False
        sub.cancel()
        return True

    def spawn(self, coro) -> None:
        """Cancels are owned here and awaited on shutdown: nothing runs detached."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("edge task failed: %r", task.exception())

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


def new_request_id() -> str:
    """128 random bits. The client sees it (X-Request-Id) and may cancel with it; the stream
    id the Coalescer picks is random too, not derived from it (see docs/security.md)."""
    return secrets.token_hex(16)
