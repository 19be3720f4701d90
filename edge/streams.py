"""Edge-local coalescing and fan-out, the asyncio side: one hub subscription per flight,
many clients.

Which clients share which flight, the one `Submit` per key, replays, admission, leaving,
the single `Cancel` per flight and hub loss are `edge/flights.py`'s `EdgeFlights` (plain
logic, run by the simulation too). This module hosts it: a client's `join` waits on its
own future until the logic admits or refuses it, the Coalescer is asked over the bridge,
the hub client subscribes, and every Cancel is a task owned here. A burst of N identical
requests costs O(1) actor messages; every client of a stream sees the same events.

A resumable client that disconnects is parked (`park`): the logic keeps its place, a timer
here ends it at its deadline (`expire`, then the caller's `ended`), and `resume` takes it
back first (docs/architecture.md "Resumable streams").
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.bridge import ActorBridge, BridgeError, BridgeTimeout
from edge.dataplane import HubClients
from edge.flights import Admit, EdgeFlights, Flight, Listen, Push, Refuse, Unlisten, Wake
from edge.rejections import Rejection
from protocols import events as ev
from protocols import messages as m
from protocols import trace
from protocols.effects import Send

log = logging.getLogger("sluice.edge.streams")

SUBMIT_TIMEOUT_S = 10.0  # the Coalescer answers a Submit once the request is admitted or refused


def unanswered_submit(exc: BridgeError) -> str:
    """The 503's message when a Submit got no answer. A timeout says only what the edge
    knows: the request was not admitted in time; the Coalescer answers after the account's
    Pacer (or a lease slice) admits, so either may be the one that is stuck."""
    if isinstance(exc, BridgeTimeout):
        return (
            f"the request was not admitted within {SUBMIT_TIMEOUT_S:g} s: "
            "the Coalescer or the account's Pacer did not answer in time"
        )
    return f"the coalescer did not answer: {exc}"


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
    admitted: asyncio.Future | None = None  # resolved when the flight logic admits (or refuses) it
    outcome: str | None = None
    key_id: str | None = None  # the API key that owns this request (None: open access)
    key_shared: bool = False  # its key's usage is counted by the Metrics actor (else by this edge)
    resumable: bool = False  # a disconnect parks it for a resume instead of leaving

    def push(self, events: list[dict]) -> None:
        for event in events:
            self.queue.put_nowait(event)

    def cancel(self, code: str = "cancelled", message: str = "cancelled by the client") -> None:
        self.queue.put_nowait(ev.error(code, message))


class LocalStreams:
    def __init__(self, bridge: ActorBridge, hub: HubClients, edge_id: str, shards: int, host: str = ""):
        self.bridge, self.hub, self.edge_id, self.shards = bridge, hub, edge_id, shards
        self.host = host  # this host in the cluster (Submit.host: the Pacer prefers a Pool here)
        self.logic = EdgeFlights(edge_id, shards)
        self.idle = asyncio.Event()  # set while no client is open (a drain waits on it)
        self.idle.set()
        self._tasks: set[asyncio.Task] = set()
        self._parked: dict[Subscriber, tuple[Callable[[], None], asyncio.TimerHandle | None]] = {}

    @property
    def by_key(self) -> dict[str, Flight]:
        return self.logic.by_key

    @property
    def by_request(self) -> dict[str, Subscriber]:
        return self.logic.by_request

    @property
    def coalesce_enabled(self) -> bool:
        return self.logic.coalesce_enabled

    async def join(
        self, request_id: str, provider: str, model: str, body: dict, key: str, received_at: float
    ) -> Subscriber:
        """Attach a new client to the flight for `key`; raises Rejection."""
        trace.stamp("edge_join", "edge", request_id)
        sub = Subscriber(request_id, "follower", received_at, provider, model)
        sub.admitted = asyncio.get_running_loop().create_future()
        self.idle.clear()
        submit = m.Submit(request_id, key, provider, model, body, self.edge_id, received_at, self.host)
        self._apply(self.logic.join(sub, submit, time.time()))
        sub.flight = self.logic.flight_of[sub][1]
        try:
            await asyncio.shield(sub.admitted)
        except BaseException:  # refused, or this client gave up while waiting
            self.leave(sub)
            raise
        return sub

    def leave(self, sub: Subscriber) -> None:
        """A client is gone (finished, disconnected, cancelled or refused)."""
        self._apply(self.logic.leave(sub, time.time()))
        if not self.logic.by_request:
            self.idle.set()

    def park(self, sub: Subscriber, grace_s: float, ended: Callable[[], None]) -> None:
        """A resumable client disconnected: its place (and the upstream call) is kept for
        `grace_s`; if nobody resumes it by then it leaves, and `ended()` runs."""
        self._parked[sub] = (ended, None)
        self._apply(self.logic.park(sub, time.time(), grace_s))

    def resume(self, sub: Subscriber) -> bool:
        """A parked client is back (False: it is not parked, or its deadline has passed)."""
        if not self.logic.resume(sub, time.time()):
            return False
        _, timer = self._parked.pop(sub)
        if timer is not None:
            timer.cancel()
        return True

    def is_parked(self, sub: Subscriber) -> bool:
        return self.logic.is_parked(sub)

    def _expire(self, sub: Subscriber, now: float) -> None:
        effects = self.logic.expire(sub, now)
        if effects is None:
            return
        ended, timer = self._parked.pop(sub)
        if timer is not None:
            timer.cancel()
        self._apply(effects)
        if not self.logic.by_request:
            self.idle.set()
        ended()

    def end_parked(self) -> None:
        """Every parked client leaves now (the edge shuts down)."""
        for sub in list(self._parked):
            self._expire(sub, now=float("inf"))

    def stray_answer(self, shard: str, answer) -> None:
        """A second answer to a Submit (asked again of a replaced shard, edge/bridge.py)."""
        self._apply(self.logic.stray_answer(shard, answer, time.time()))

    def cancel(self, request_id: str, key_id: str | None = None) -> bool:
        """Cancel one client's request; only its own key may (False otherwise, as unknown)."""
        sub = self.logic.by_request.get(request_id)
        if sub is None or sub.key_id != key_id:
            return False
        if self.logic.is_parked(sub):  # nobody reads its queue: it ends now
            self._expire(sub, now=float("inf"))
        else:
            sub.cancel()
        return True

    # --- carrying out the logic's effects ------------------------------------------------
    def _apply(self, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, Push):
                effect.client.push(effect.events)
            elif isinstance(effect, Admit):
                sub = effect.client
                sub.flight, sub.role, sub.fanout = effect.flight, effect.role, effect.fanout
                if not sub.admitted.done():
                    sub.admitted.set_result(None)
            elif isinstance(effect, Refuse):
                r = effect.rejected
                if not effect.client.admitted.done():
                    effect.client.admitted.set_exception(Rejection(r.status, r.code, r.message, r.retry_after_s))
                    effect.client.admitted.exception()  # the waiting client re-raises it; mark it retrieved
            elif isinstance(effect, Wake):
                ended, _ = self._parked[effect.client]
                delay = max(0.0, effect.at - time.time())
                # at its deadline (a timer may fire a hair early: the deadline is the clock)
                timer = asyncio.get_running_loop().call_later(delay, self._expire, effect.client, effect.at)
                self._parked[effect.client] = (ended, timer)
            elif isinstance(effect, Listen):
                self.spawn(self._listen(effect.flight))
            elif isinstance(effect, Unlisten):
                if effect.flight.listener is not None:
                    self.hub.unsubscribe(effect.flight.stream_id, effect.flight.listener, effect.flight.hub)
            elif isinstance(effect, Send) and isinstance(effect.msg, m.Submit):
                self.spawn(self._submit(effect.to, effect.msg))
            elif isinstance(effect, Send):
                self.spawn(self.bridge.tell(effect.to, effect.msg))
            else:
                raise TypeError(f"unexpected effect {effect!r}")

    async def _submit(self, shard: str, submit: m.Submit) -> None:
        """Ask the Coalescer; the logic resolves every registered client, on every path:
        a failure here must never leave clients waiting on a dead flight."""
        try:
            try:
                reply = await self.bridge.ask(shard, submit, timeout=SUBMIT_TIMEOUT_S)
            except BridgeError as exc:
                if exc.code == "unencodable":  # edge/body_limits.py should have refused it
                    log.error("request %s not submitted: %s", submit.request_id, exc)
                    reply = m.Rejected(
                        submit.request_id, 422, "invalid_request", f"the request cannot be forwarded: {exc}"
                    )
                else:
                    reply = m.Rejected(submit.request_id, 503, "gateway_unavailable", unanswered_submit(exc))
            self._apply(self.logic.answer(submit.request_id, reply, time.time()))
        except Exception:
            log.exception("submitting request %s failed", submit.request_id)
            self._apply(self.logic.failed(submit.request_id, time.time()))

    async def _listen(self, flight: Flight) -> None:
        flight.listener = lambda seq, events: self._apply(self.logic.frame(flight, seq, events, time.time()))
        try:
            await self.hub.subscribe(flight.stream_id, flight.ticket, flight.listener, flight.hub)
        except OSError as exc:
            self._apply(self.logic.listen_failed(flight, f"stream hub unreachable: {exc}", time.time()))
            return
        self._apply(self.logic.listened(flight))

    def spawn(self, coro) -> asyncio.Task:
        """Cancels are owned here and awaited on shutdown: nothing runs detached."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

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
