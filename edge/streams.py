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
import time
import uuid
from dataclasses import dataclass, field

from edge.bridge import ActorBridge, BridgeError
from edge.dataplane import HubClient
from protocols import events as ev
from protocols import messages as m
from protocols.keys import shard_of

log = logging.getLogger("sluice.edge.streams")


class Rejection(Exception):
    """The request is refused before streaming starts (HTTP status and JSON error)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


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
    flight: "Flight | None" = None
    outcome: str | None = None

    def push(self, events: list[dict]) -> None:
        for event in events:
            self.queue.put_nowait(event)

    def cancel(self, code: str = "cancelled", message: str = "cancelled by the client") -> None:
        self.queue.put_nowait(ev.error(code, message))


@dataclass(eq=False)
class Flight:
    key: str
    stream_id: str
    shard: str
    coalesce: bool
    fanout: bool
    events: list = field(default_factory=list)
    subscribers: set = field(default_factory=set)
    finished: bool = False


class LocalStreams:
    def __init__(self, bridge: ActorBridge, hub: HubClient, edge_id: str, shards: int):
        self.bridge, self.hub, self.edge_id, self.shards = bridge, hub, edge_id, shards
        self.by_key: dict[str, Flight] = {}
        self.pending: dict[str, asyncio.Future] = {}
        self.by_request: dict[str, Subscriber] = {}
        self._tasks: set[asyncio.Task] = set()

    async def join(self, request_id: str, provider: str, model: str, body: dict, key: str, received_at: float) -> Subscriber:
        """Attach a new client to the flight for `key`; raises Rejection."""
        if key:
            flight = self.by_key.get(key)
            if flight is None and key in self.pending:
                flight = await asyncio.shield(self.pending[key])
            if flight is not None and not flight.finished and flight.coalesce:
                return self._attach(flight, request_id, "follower", received_at, provider, model)
        future = asyncio.get_running_loop().create_future()
        if key:
            self.pending[key] = future
        try:
            flight, role = await self._submit(request_id, provider, model, body, key, received_at)
        except Rejection as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs it
            raise
        finally:
            if key and self.pending.get(key) is future:
                del self.pending[key]
        future.set_result(flight)
        return self._attach(flight, request_id, role, received_at, provider, model)

    async def _submit(self, request_id, provider, model, body, key, received_at) -> tuple[Flight, str]:
        shard = f"coalescer:{shard_of(key, self.shards, request_id)}"
        submit = m.Submit(request_id, key, provider, model, body, self.edge_id, received_at)
        try:
            reply = await self.bridge.ask(shard, submit, timeout=10.0)
        except BridgeError as exc:
            raise Rejection(503, "gateway_unavailable", f"the coalescer did not answer: {exc}") from None
        if isinstance(reply, m.Rejected):
            raise Rejection(reply.status, reply.code, reply.message, reply.retry_after_s)
        if not isinstance(reply, m.Admitted):
            raise Rejection(503, "gateway_unavailable", f"unexpected answer {type(reply).__name__}")
        flight = Flight(key, reply.stream_id, shard, reply.coalesce and bool(key), reply.fanout)
        if reply.error is not None:  # a failure still within its error TTL: replay it
            flight.events.append(reply.error)
            flight.finished = True
            return flight, reply.role
        if flight.coalesce:
            self.by_key[key] = flight
        try:
            await self.hub.subscribe(flight.stream_id, lambda events: self._on_events(flight, events))
        except OSError as exc:
            self._forget(flight)
            self.spawn(self.bridge.tell(shard, m.Cancel(flight.stream_id, self.edge_id, time.time())))
            raise Rejection(503, "gateway_unavailable", f"stream hub unreachable: {exc}") from None
        return flight, reply.role

    def _attach(self, flight: Flight, request_id, role, received_at, provider, model) -> Subscriber:
        sub = Subscriber(request_id, role, received_at, provider, model, fanout=flight.fanout or role == "leader")
        sub.flight = flight
        flight.subscribers.add(sub)
        self.by_request[request_id] = sub
        sub.push(flight.events)
        return sub

    def _on_events(self, flight: Flight, events: list[dict]) -> None:
        if flight.finished:
            return
        flight.events.extend(events)
        for sub in flight.subscribers:
            sub.push(events)
        if any(ev.is_terminal(e) for e in events):
            flight.finished = True
            self._forget(flight)

    def leave(self, sub: Subscriber) -> None:
        """A client is gone (finished, disconnected or cancelled)."""
        self.by_request.pop(sub.request_id, None)
        flight = sub.flight
        if flight is None or sub not in flight.subscribers:
            return
        flight.subscribers.discard(sub)
        if flight.subscribers or flight.finished:
            return
        self._forget(flight)
        flight.finished = True
        self.spawn(self.bridge.tell(flight.shard, m.Cancel(flight.stream_id, self.edge_id, time.time())))

    def _forget(self, flight: Flight) -> None:
        if self.by_key.get(flight.key) is flight:
            del self.by_key[flight.key]
        self.hub.unsubscribe(flight.stream_id)

    def cancel(self, request_id: str) -> bool:
        sub = self.by_request.get(request_id)
        if sub is None:
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
            log.warning("cancel message failed: %s", task.exception())

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


def new_request_id() -> str:
    return uuid.uuid4().hex
