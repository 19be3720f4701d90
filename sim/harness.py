"""The actor simulation harness: the real Pacer and Coalescer logic on a virtual clock.

FoundationDB-style: one thread, one priority queue of `(time, seq, event)`, one seeded
random generator. Everything that happens is an event on that queue, so a run is a pure
function of its seed and its script, and a failure replays exactly from its seed.

What runs for real: `PacerLogic` (one per provider account), `CoalescerLogic` (N shards,
keyed with `protocols.keys.shard_of` like the edge does), and, inside the hosts below,
`EdgeFlights`, `Listeners`, `PoolLogic`, `HubLogic` and `MetricsLogic`. What is
simulated, in a few lines each, with the real behaviour as the model:

  * `SimEdge`  -- edge/streams.py + edge/dataplane.py: hosts the real `EdgeFlights`
                  (edge/flights.py: local flights, one Submit per key, replays, one
                  Cancel when the last local client of an unfinished flight leaves, hub
                  loss, stray answers) and `Listeners` (edge/listeners.py); records what
                  each client received, and measures and records each request with the
                  edge's code (edge/measures.py; edge/records.py `RecordBatch`).
  * `SimPool`  -- actors/pool.py: hosts the real `PoolLogic` (actors/pool_logic.py:
                  which calls run, AbortStream / FailStream, every ending's LeaseRelease
                  to the Pacer, StreamFinished to the Coalescer and records); its `Start`
                  runs a scripted upstream call (TTFT, token pace, token count, failure,
                  429 Retry-After) where the real Pool runs actors/upstream.py, its `Stop`
                  aborts it. Its stream hub is the real `HubLogic` (actors/hub_logic.py:
                  replay, subscribers, tickets, linger, orphans), swept on a timer at its
                  `next_due`; every edge in the simulation is honest, so a refused
                  Subscribe fails the run (a ticket given to the wrong edge, or none).
  * `SimMetrics` (optional) -- hosts the real `MetricsLogic`.

With `pools=M` there are M `SimPool`s ("pool", "pool:1", ...; SLUICE_POOLS), each with its
own hub, and the Pacer's real routing (actors/pool_choice.py) picks the Pool of each call;
an edge subscribes at the hub its `Admitted` names, and a dead Pool takes only its own
hub's streams with it (the check: every client listened at the Pool that ran its call).
`hosts` places Pools and edges on cluster hosts (`{"pool:1": "B", "e2": "B"}`; unnamed
ones are on ""): an edge's Submit names its host and the Pacer's choice prefers a Pool
there (Pool locality, docs/scale-out.md), as the Supervisor's Wire.hosts tells it.

The network: every message between nodes is encoded with `protocols.messages.encode` and
decoded again (a field msgpack cannot carry fails the run), then delivered after a seeded
latency, first-in first-out per (sender, receiver) pair like Thespian over TCP. Faults are
those TCP allows: latency and jitter, a node paused (a GC pause, SIGSTOP: its messages and
timers wait, then arrive at once) and wall-clock steps (the `now` a node's logic sees
jumps). Messages are never dropped or reordered within a pair, except by a crash:
`sim.kill(node, at)` SIGKILLs a Pool, the Pacer or a Coalescer shard. Whatever it held
is lost, messages and timers addressed to that incarnation vanish, the edges lose their
hub connection when the Pool dies, and after `restart_s` the Supervisor's part is played:
the replacement is wired, and once every killed node is up again `MemberLost` goes to the
Pacer and the shards (a shard's death to the Pools too), by the Supervisor's own rule (actors/member_loss.py `LostMembers`;
docs/reliability.md, "Process crashes").

Use (see docs/simulation.md):

    sim = Simulation(seed=7, shards=2, pacer=PacerSettings(rps=1, burst=2, concurrency=3))
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    c = sim.client(at=0.0, text="hi", edge="e1")
    sim.run()                      # to quiescence; then the invariants are checked
    assert sim.pool.calls == 1 and c.outcome == "done"

A failing run says its seed; `SLUICE_SIM_SEED=<n>` makes `seeds()` (and a Simulation
without an explicit seed) replay that one seed.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from actors.coalescer_logic import CoalescerLogic
from actors.hub_logic import HubLogic, orphan_after
from actors.member_loss import LostMembers
from actors.metrics_logic import MetricsLogic
from actors.pacer_logic import PacerLogic, PoolAt
from actors.pool_choice import PoolChoice
from actors.pool_logic import CANCELLED, CallEnd, FlushOpened, FlushRecords, MarkOpen, PoolLogic, Publish, Start, Stop
from edge.dataplane import hub_lost
from edge.flights import Admit, EdgeFlights, Flight, Listen, Push, Refuse, Unlisten
from edge.listeners import Listeners
from edge.measures import DISCONNECTED, Measures, rejected, request_record
from edge.records import RecordBatch, RecordsDue
from protocols import events as ev
from protocols import messages as m
from protocols import roles, stream_ids
from protocols.effects import After, Send
from protocols.keys import coalescing_key
from protocols.providers.base import error_from_response
from protocols.settings import CoalescerFlags, PacerSettings

SEED_ENV = "SLUICE_SIM_SEED"
SIM_SECRET = b"the simulation's cluster secret"

# Message types of the data plane (Pool hub <-> edges); everything else is control plane.
DATA_PLANE = (m.Subscribe, m.Unsubscribe, m.StreamData)


def _counted_ids(prefix: str, owner: str | None = None) -> Callable[[], str]:
    """Stream ids for a shard: a counter, not random, so a run replays from its seed;
    tagged with the shard incarnation `owner` as the real ones are (protocols/stream_ids.py)."""
    counter = itertools.count(1)
    if owner is None:
        return lambda: f"{prefix}{next(counter)}"
    return lambda: stream_ids.owned(f"{prefix}{next(counter)}", SIM_SECRET, owner)


def seeds(n: int, first: int = 0) -> list[int]:
    """The seeds to run: `first .. first+n-1`, or only $SLUICE_SIM_SEED when it is set."""
    if os.environ.get(SEED_ENV):
        return [int(os.environ[SEED_ENV])]
    return list(range(first, first + n))


class SimulationError(AssertionError):
    """A broken invariant or a crash inside the simulated system; names the seed."""


# --- the scripted upstream --------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """How one upstream call behaves. The call's duration without failure is
    `ttft_ms + tokens * token_interval_ms`: the first byte carries token 0, then one token
    every `token_interval_ms`, then `done`."""

    ttft_ms: float = 200.0
    token_interval_ms: float = 20.0
    tokens: int = 10
    fail: int | str | None = None  # None | "error" (in-band, after `fail_after` tokens) | HTTP status
    fail_after: int = 0
    retry_after_s: float | None = None  # with an HTTP 429/5xx: the Retry-After header
    error_code: str = "upstream_error"  # code of an in-band "error"

    @property
    def duration_s(self) -> float:
        return (self.ttft_ms + self.tokens * self.token_interval_ms) / 1000.0


def chaotic_upstream(rng: random.Random) -> Callable[[UpstreamRequest], Upstream]:
    """The chaos runs' provider, every call drawn from `rng`: 10 % a 429 (with or without a
    Retry-After), 10 % an in-band error after a few tokens, else a stream of random pace
    and length."""

    def behaviour(req: UpstreamRequest) -> Upstream:
        kind = rng.random()
        if kind < 0.1:
            return Upstream(ttft_ms=rng.uniform(50, 400), fail=429, retry_after_s=rng.choice([None, 0.5, 2.0]))
        if kind < 0.2:
            return Upstream(ttft_ms=rng.uniform(50, 400), tokens=10, fail="error", fail_after=rng.randrange(0, 10))
        return Upstream(ttft_ms=rng.uniform(50, 800), token_interval_ms=rng.uniform(5, 60), tokens=rng.randrange(0, 15))

    return behaviour


@dataclass(frozen=True)
class UpstreamRequest:
    """What a behaviour function sees: the n-th upstream call (1-based) and its request."""

    n: int
    stream_id: str
    provider: str
    model: str
    body: dict
    at: float

    @property
    def text(self) -> str:
        return self.body["messages"][-1]["content"]


@dataclass
class UpstreamCall:
    """One upstream call as the simulated Pool ran it."""

    n: int
    stream_id: str
    provider: str
    coalescer: str
    behaviour: Upstream
    queue_wait_ms: float
    opened_at: float
    first_byte_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None  # "done" | "error" | "cancelled"
    abort_requested_at: float | None = None  # AbortStream.requested_at (the edge's clock)
    aborted_at: float | None = None  # virtual time the Pool stopped the call


# --- clients ------------------------------------------------------------------------------------


@dataclass(eq=False)
class SimClient:
    """One HTTP client of an edge, and everything it received."""

    request_id: str
    edge: str
    at: float
    body: dict
    key: str
    provider: str
    model: str
    disconnect_at: float | None = None
    role: str | None = None  # "leader" | "follower" once admitted
    stream_id: str | None = None
    fanout: bool | None = None  # False: an SSE renderer holds deltas back until the end
    events: list = field(default_factory=list)
    outcomes: list = field(default_factory=list)  # every terminal outcome (must be one)
    ended_at: float | None = None
    status: int | None = None  # rejected: HTTP status, code, Retry-After
    code: str | None = None
    retry_after_s: float | None = None
    flight: Any = None
    replayed: bool = False  # got a remembered error (error TTL) instead of a stream
    hub_lost: bool = False  # its stream ended with the edge's own hub_disconnected
    measures: Measures = field(init=False)  # TTFT & co., as its edge measured them (edge/measures.py)

    def __post_init__(self) -> None:
        self.measures = Measures(self.at)

    @property
    def outcome(self) -> str | None:
        """ "done" | "error" | "cancelled" | "rejected" | "disconnected" | None (still waiting)."""
        return self.outcomes[0] if self.outcomes else None

    @property
    def deltas(self) -> list[str]:
        return [e["delta"] for e in self.events if e.get("type") == ev.DELTA]

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def error(self) -> dict | None:
        return next((e for e in self.events if e.get("type") == ev.ERROR), None)

    def _end(self, outcome: str, now: float) -> None:
        self.outcomes.append(outcome)
        if self.ended_at is None:
            self.ended_at = now


# local events of a node (never on the wire)
@dataclass(frozen=True)
class _Arrive:
    client: SimClient


@dataclass(frozen=True)
class _Disconnect:
    client: SimClient


@dataclass(frozen=True)
class _Step:
    stream_id: str
    index: int


@dataclass(frozen=True)
class _Configure:
    changes: dict


@dataclass(frozen=True)
class _Sweep:
    """Hub timer: `HubLogic.sweep` is due (a linger over, an orphan to end)."""

    due: float


@dataclass(frozen=True)
class _HubLost:
    """The edge's connection to the hub of Pool `hub` dropped (that Pool died)."""

    up: bool = False  # True: the directory names a new hub again
    hub: str = roles.POOL


@dataclass(frozen=True)
class _ShardMoved:
    """The directory names a replacement for `shard`: Submits still unanswered go to it."""

    shard: str


# --- the simulated edge ---------------------------------------------------------------------


class SimEdge:
    """One edge process: the real `EdgeFlights` (edge/flights.py) and `Listeners`
    (edge/listeners.py), hosted as edge/streams.py, edge/dataplane.py and edge/app.py do."""

    def __init__(self, name: str, shards: int, metrics: bool, host: str = ""):
        self.name, self.edge_id, self.shards = f"edge:{name}", name, shards
        self.host = host  # its cluster host (Submit.host)
        self.logic = EdgeFlights(name, shards)
        # The hub clients' bookkeeping, one per Pool (edge/dataplane.py HubClients).
        self.listeners_at: dict[str, Listeners[Flight]] = {}
        self.clients: list[SimClient] = []
        self.waiting: dict[SimClient, list] = {}  # not admitted yet -> events queued for it
        self.records = RecordBatch(self.name)  # edge/records.py, as RecordSender hosts it
        self.metrics = metrics  # False: no Metrics node, the records are not kept
        self.hubs_down: set[str] = set()  # Pools whose hub the directory does not name now
        self.shared_listens = 0  # a flight listened to a stream another local flight was on

    def handle(self, msg, sender, now: float) -> list:
        if isinstance(msg, _Arrive):
            client = msg.client
            self.clients.append(client)
            self.waiting[client] = []
            submit = m.Submit(
                client.request_id, client.key, client.provider, client.model, client.body, self.edge_id, now, self.host
            )
            out = self.logic.join(client, submit, now)
            client.flight = self.logic.flight_of[client][1]
            return self._apply(out, now)
        if isinstance(msg, _Disconnect):
            client = msg.client
            if client.outcome is not None:
                return []
            self.waiting.pop(client, None)  # waiting for its answer: the join is cancelled
            return self._end(
                client, "disconnected", now, client.measures.ended(DISCONNECTED, client.provider, client.model)
            )
        if isinstance(msg, (m.Admitted, m.Rejected)):
            if msg.request_id in self.logic.submits:
                return self._apply(self.logic.answer(msg.request_id, msg, now), now)
            # A second answer to a Submit sent again to a replaced shard (edge/bridge.py).
            return self._apply(self.logic.stray_answer(sender.partition("@")[0], msg, now), now)
        if isinstance(msg, m.StreamData):
            out: list = []
            for flight in self.listeners(sender).of(msg.stream_id):  # each local flight on it (at that hub)
                out += self._apply(self.logic.frame(flight, msg.seq, msg.events, now), now)
            return out
        if isinstance(msg, RecordsDue):
            return self.records.due()
        if isinstance(msg, _HubLost):
            return self._hub_lost(msg, now)
        if isinstance(msg, _ShardMoved):  # edge/bridge.py follows the role to its replacement
            return [Send(msg.shard, f.submit) for f in self.logic.unanswered() if f.shard == msg.shard]
        raise TypeError(f"{self.name}: unexpected {type(msg).__name__}")

    def listeners(self, hub: str) -> Listeners[Flight]:
        """The listeners of the hub client for Pool `hub` ("" is "pool")."""
        return self.listeners_at.setdefault(hub or roles.POOL, Listeners())

    def _hub_lost(self, msg: _HubLost, now: float) -> list:
        """edge/dataplane.py: every listener of that hub hears the connection's end (seq None)."""
        if msg.up:
            self.hubs_down.discard(msg.hub)
            return []
        self.hubs_down.add(msg.hub)
        out: list = []
        for flights in self.listeners(msg.hub).pop_all().values():
            for flight in flights:
                for client in flight.clients:
                    client.hub_lost = True
                out += self._apply(self.logic.frame(flight, None, [hub_lost()], now), now)
        return out

    def _apply(self, effects: list, now: float) -> list:
        """Carry out the flight logic's effects; -> the messages to send."""
        out: list = []
        for effect in effects:
            if isinstance(effect, Push):
                if effect.client in self.waiting:  # its response has not started yet
                    self.waiting[effect.client] += effect.events
                elif effect.client.outcome is None:
                    out += self._push(effect.client, effect.events, now)
            elif isinstance(effect, Admit):
                client = effect.client
                if client not in self.waiting:
                    continue
                client.flight, client.role, client.fanout = effect.flight, effect.role, effect.fanout
                client.stream_id, client.replayed = client.flight.stream_id, client.flight.replayed
                out += self._push(client, self.waiting.pop(client), now)
            elif isinstance(effect, Refuse):
                client, r = effect.client, effect.rejected
                if self.waiting.pop(client, None) is None:
                    continue
                client.role = client.role or "leader"
                client.status, client.code, client.retry_after_s = r.status, r.code, r.retry_after_s
                out += self._end(client, "rejected", now, rejected(r.code, client.provider, client.model))
            elif isinstance(effect, Listen):
                flight = effect.flight
                hub = flight.hub or roles.POOL
                if hub in self.hubs_down:  # no hub to connect to: edge/streams.py's OSError path
                    out += self._apply(self.logic.listen_failed(flight, "stream hub unreachable", now), now)
                    continue
                self.shared_listens += flight.stream_id in self.listeners(hub)
                self.listeners(hub).add(flight.stream_id, flight)
                out.append(Send(hub, m.Subscribe(flight.stream_id, flight.ticket)))
                out += self._apply(self.logic.listened(flight), now)
            elif isinstance(effect, Unlisten):
                hub = effect.flight.hub or roles.POOL
                if self.listeners(hub).remove(effect.flight.stream_id, effect.flight):
                    out.append(Send(hub, m.Unsubscribe(effect.flight.stream_id)))
            elif isinstance(effect, Send):
                out.append(effect)
            else:
                raise TypeError(f"{self.name}: unexpected effect {effect!r}")
        return out

    def _push(self, client: SimClient, events: list, now: float) -> list:
        """Events reach the client (edge/admission.py renders them): measured as there."""
        for event in events:
            client.events.append(event)
            if event.get("type") == ev.STARTED:
                client.measures.started(event, now, leader=client.role == "leader")
            if ev.is_terminal(event):
                ended = client.measures.terminal(event)
                return self._end(
                    client, ended["outcome"], now, client.measures.ended(ended, client.provider, client.model)
                )
        return []

    def _end(self, client: SimClient, outcome: str, now: float, recorded: dict) -> list:
        """The client's response ended: leave, and record it (edge/app.py `_release`,
        `_record`) with the outcome `recorded` (edge/measures.py)."""
        client._end(outcome, now)
        record = request_record(client.request_id, client.role or "leader", client.at, recorded, now)
        return self._apply(self.logic.leave(client, now), now) + (self.records.add(record) if self.metrics else [])


# --- the simulated Pool (upstream calls + stream hub) -------------------------------------------


class SimPool:
    """actors/pool.py's `PoolRuntime` for the simulation: hosts the real `PoolLogic`
    (actors/pool_logic.py: which calls run, Open/Abort/FailStream, every ending's
    LeaseRelease, StreamFinished and records) and the real `HubLogic`, with a scripted
    upstream in place of HTTP (`Start` runs an `Upstream`, `Stop` aborts it)."""

    def __init__(self, metrics: bool, secret: bytes = SIM_SECRET, name: str = roles.POOL):
        self.name = name  # its role: "pool", "pool:1", ...
        self.secret = secret
        self.metrics = metrics  # False: no Metrics node, the logic's Records go nowhere
        self.behaviour: Upstream | Callable[[UpstreamRequest], Upstream] = Upstream()
        self.log: list[UpstreamCall] = []
        self.running: dict[str, UpstreamCall] = {}
        self.orphan_s = 90.0  # the Simulation sets PACER_MAX_WAIT + 60 s, like actors/pool.py
        self.failed: list[tuple[str, str]] = []  # FailStream (stream_id, code)
        # What each stream published, per hub that held it (a dead incarnation's too, and
        # one dropped after its linger): stream id -> [events list of each HubStream].
        self.published: dict[str, list[list]] = {}
        self.incarnation = name
        self._boot()

    def _boot(self) -> None:
        """A fresh process: an empty hub, an empty Pool logic, no timers."""
        self.hub = HubLogic(self.secret, orphan_s=self.orphan_s)
        self.logic = PoolLogic(self.name, self.hub)
        self._sweep_at: float | None = None  # the hub's sweep timer, when one is set

    def crash(self, now: float) -> None:
        """SIGKILL: the calls stop without a word (no LeaseRelease, no StreamFinished), the
        hub and its replay buffers are gone (`published` keeps what they had sent)."""
        for call in self.running.values():
            call.outcome, call.ended_at = "lost", now
        self.running.clear()
        self._boot()

    @property
    def calls(self) -> int:
        """Upstream calls made."""
        return len(self.log)

    def handle(self, msg, sender, now: float) -> list:
        out = self._handle(msg, sender, now)
        stream_id = getattr(msg, "stream_id", None)  # only such messages create hub streams
        if stream_id is not None:
            self._observe(stream_id)
        return out + self._sweep_timer(now)

    def _owner_lost(self, msg: m.MemberLost, now: float) -> list:
        """A shard died (actors/pool.py `member_lost`): the hub ends the streams it left
        unopened; they count as failed for the checker (a grant of one comes straight back)."""
        if not roles.is_coalescer(msg.role):
            raise TypeError(f"{self.name}: told of the death of {msg.role}, which holds nothing here")
        waiting = [sid for sid, stream in self.hub.streams.items() if stream.finished_at is None]
        out = self.hub.owner_lost(msg.role, msg.incarnation, now)
        for sid in waiting:
            if self.hub.is_finished(sid):  # nothing else ends a stream here meanwhile
                self.failed.append((sid, "coalescer_lost"))
                self._observe(sid)
        return out

    def _handle(self, msg, sender, now: float) -> list:
        if isinstance(msg, m.FailStream):
            self.failed.append((msg.stream_id, msg.code))
        if isinstance(msg, (m.OpenStream, m.AbortStream, m.FailStream, FlushRecords, FlushOpened)):
            self.logic.incarnation = self.incarnation  # as actors/pool.py tells it its address
            return self._apply(self.logic.handle(msg, now), now)
        if isinstance(msg, m.MemberLost):
            return self._owner_lost(msg, now)
        if isinstance(msg, _Step):
            call = self.running.get(msg.stream_id)
            return self._step(call, msg.index, now) if call is not None else []
        if isinstance(msg, (m.Subscribe, m.Unsubscribe)):
            edge_id = sender.partition(":")[2]  # node "edge:<edge id>" (the hub's handshake)
            was_over = self.hub.is_finished(msg.stream_id)
            out = self.hub.handle(msg, sender, edge_id, now)
            if not was_over and self.hub.is_finished(msg.stream_id):  # its shard died since
                self.failed.append((msg.stream_id, "coalescer_lost"))
            refused = [e.msg for e in out if isinstance(e.msg, m.SubscribeRefused)]
            if refused:
                raise PermissionError(f"the hub refuses {sender}'s Subscribe to {msg.stream_id}: not its ticket")
            return out
        if isinstance(msg, _Sweep):
            if msg.due == self._sweep_at:
                self._sweep_at = None
            return self.hub.sweep(now)
        raise TypeError(f"{self.name}: unexpected {type(msg).__name__}")

    def _apply(self, effects: list, now: float) -> list:
        """Carry out the Pool logic's effects, as PoolRuntime does; -> what goes out."""
        out: list = []
        for effect in effects:
            if isinstance(effect, Start):
                out += self._start(effect.open, now)
            elif isinstance(effect, Stop):
                out += self._stop(effect.stream_id, now)
            elif isinstance(effect, MarkOpen):
                self.hub.mark_open(effect.stream_id, now)
            elif isinstance(effect, Publish):
                out += self.hub.publish(effect.stream_id, effect.events, now)
            elif isinstance(effect, Send) and isinstance(effect.msg, m.Records) and not self.metrics:
                continue
            elif isinstance(effect, (Send, After)):
                out.append(effect)
            else:
                raise TypeError(f"{self.name}: unexpected effect {effect!r}")
        return out

    def _observe(self, stream_id: str) -> None:
        stream = self.hub.streams.get(stream_id)
        if stream is not None:
            kept = self.published.setdefault(stream_id, [])
            if not any(events is stream.events for events in kept):
                kept.append(stream.events)

    def _sweep_timer(self, now: float) -> list:
        """The real hub sweeps once a second; here a timer fires when the logic says."""
        due = self.hub.next_due()
        if due is None or (self._sweep_at is not None and self._sweep_at <= due):
            return []
        self._sweep_at = due
        return [After(max(0.0, due - now) + 1e-6, _Sweep(due))]  # a hair late: no float tie

    # --- the scripted upstream (actors/upstream.py's part) ------------------------------------
    def _start(self, msg: m.OpenStream, now: float) -> list:
        request = UpstreamRequest(len(self.log) + 1, msg.stream_id, msg.provider, msg.model, msg.body, now)
        behaviour = self.behaviour(request) if callable(self.behaviour) else self.behaviour
        call = UpstreamCall(request.n, msg.stream_id, msg.provider, msg.coalescer, behaviour, msg.queue_wait_ms, now)
        self.log.append(call)
        self.running[msg.stream_id] = call
        return [After(behaviour.ttft_ms / 1000.0, _Step(msg.stream_id, 0))]

    def _stop(self, stream_id: str, now: float) -> list:
        """The call's task cancelled: run_call publishes the cancellation, the end follows."""
        call = self.running.get(stream_id)
        if call is None:
            return []
        call.abort_requested_at, call.aborted_at = self.logic.calls[stream_id].abort_requested_at, now
        error = ev.error("cancelled", CANCELLED)
        return self.hub.publish(stream_id, [error], now) + self._end(call, "cancelled", None, None, now)

    def _step(self, call: UpstreamCall, i: int, now: float) -> list:
        b = call.behaviour
        if i == 0 and isinstance(b.fail, int):  # an HTTP error status instead of a stream
            # the response as actors/upstream.py reads it: the Retry-After header parsed, and
            # kept for the Pacer (only a 429 or a 5xx carries one) but not published
            headers = [] if b.retry_after_s is None else [(b"retry-after", repr(b.retry_after_s).encode())]
            error = error_from_response(b.fail, headers, b"", now=now)
            retry = error.pop("retry_after_s", None)
            # nothing reached the hub: the Pool publishes the error once it gives up (no retries here)
            return self.hub.publish(call.stream_id, [error], now) + self._end(call, "error", error, retry, now)
        events = []
        if i == 0:
            call.first_byte_at = now
            events.append(ev.started(now, call.queue_wait_ms))
        if b.fail == "error" and i == b.fail_after:
            error = ev.error(b.error_code, "the upstream failed mid-stream")
            return self.hub.publish(call.stream_id, [*events, error], now) + self._end(call, "error", error, None, now)
        if i >= b.tokens:
            events.append(ev.done("stop", ev.usage(3, b.tokens)["usage"]))
            return self.hub.publish(call.stream_id, events, now) + self._end(call, "done", None, None, now)
        events.append(ev.delta(f"c{call.n}.{i} "))
        return self.hub.publish(call.stream_id, events, now) + [
            After(b.token_interval_ms / 1000.0, _Step(call.stream_id, i + 1))
        ]

    def _end(self, call: UpstreamCall, outcome: str, error: dict | None, retry_after: float | None, now: float) -> list:
        """The call is over: what it owes (LeaseRelease, StreamFinished, records) the logic says."""
        del self.running[call.stream_id]
        call.outcome, call.ended_at = outcome, now
        usage = ev.usage(3, call.behaviour.tokens)["usage"] if outcome == "done" else None
        end = CallEnd(outcome, error, retry_after, call.opened_at, call.first_byte_at, now, 1, None, usage)
        return self._apply(self.logic.ended(call.stream_id, end, now), now)


class SimMetrics:
    """The Metrics actor: the real MetricsLogic, fed by the edges' and the Pool's batches."""

    name = "metrics"

    def __init__(self):
        self.logic = MetricsLogic()

    def handle(self, msg, sender, now: float) -> list:
        if isinstance(msg, m.Records):
            self.logic.ingest(msg.records, now)
        return []


# --- hosts for the real logic classes -----------------------------------------------------------


class _PacerHost:
    """Drives PacerLogic like actors/pacer.py does, and watches its leases for the checker."""

    def __init__(self, logic: PacerLogic, sim: Simulation):
        self.logic, self.sim = logic, sim

    def handle(self, msg, sender, now: float) -> list:
        before = set(self.logic.in_flight)
        if isinstance(msg, _Configure):
            out = self.logic.configure(msg.changes, now)
        elif isinstance(msg, PoolAt):
            out = self.logic.handle(msg, sender, now)
        else:
            out = self.logic.handle(msg, sender, now)
        after = set(self.logic.in_flight)
        for lease_id in sorted(after - before):
            if lease_id in self.sim.leases and self.sim.leases[lease_id].released_at is None:
                self.sim.fail(f"pacer granted lease {lease_id} twice")
            # Granted again after its release: a stream id asked for anew by a replaced shard
            # (the edge re-sends its Submit, same request id); the Pool gives it straight back.
            self.sim.leases[lease_id] = Lease(lease_id, self.sim.now)
            if len(after) > self.logic.settings.concurrency:
                self.sim.fail(f"pacer granted {lease_id} with {len(after)} in flight > concurrency")
        for lease_id in sorted(before - after):
            lease = self.sim.leases[lease_id]
            lease.released_at, lease.released_by = self.sim.now, type(msg).__name__
        if isinstance(msg, m.MemberLost) and roles.is_pool(msg.role):
            held = [k for k, h in self.logic.in_flight.items() if h.pool == msg.incarnation]
            if held:
                self.sim.fail(f"pacer still holds leases {held} of the dead {msg.incarnation}")
        if isinstance(msg, m.LeaseRelease) and msg.lease_id not in before:
            # Legitimate only after a LeaseCancel: everyone left while the grant that
            # opened the call was on its way to the Coalescer.
            lease = self.sim.leases.get(msg.lease_id) or self.sim.old_leases.get(msg.lease_id)
            if lease is None or lease.released_by not in ("LeaseCancel", "MemberLost", "PacerLost"):
                self.sim.fail(f"LeaseRelease for {msg.lease_id}, which the pacer no longer held (released twice?)")
        return out


class _CoalescerHost:
    def __init__(self, logic: CoalescerLogic):
        self.logic = logic

    def handle(self, msg, sender, now: float) -> list:
        if isinstance(msg, _Configure):  # the admin `set_flags` (actors/coalescer.py)
            self.logic.set_flags(msg.changes)
            return []
        out = self.logic.handle(msg, sender, now)
        if isinstance(msg, m.MemberLost) and roles.is_pool(msg.role):
            kept = [f.stream_id for f in self.logic.by_stream.values() if f.pool == msg.incarnation]
            if kept:
                raise SimulationError(f"{self.logic.me} keeps flights {kept} of the dead {msg.incarnation}")
        return out


@dataclass
class Lease:
    lease_id: str
    granted_at: float
    released_at: float | None = None
    released_by: str | None = None  # "LeaseRelease" (the Pool) | "LeaseCancel" (the Coalescer)
    # | "MemberLost" (reclaimed from a dead Pool or shard) | "PacerLost" (died with the Pacer)


@dataclass
class Delivery:
    """One message that crossed the simulated network."""

    sent_at: float
    src: str
    dst: str
    msg: Any
    delivered_at: float | None = None  # when the receiver handled it
    order: int | None = None  # position among all handled messages (ties in time are common)


@dataclass(eq=False)
class _Node:
    name: str
    logic: Any
    clock_offset: float = 0.0
    paused_until: float = 0.0
    backlog: deque = field(default_factory=deque)
    incarnation: int = 1
    down: bool = False


# --- the simulation -------------------------------------------------------------------------------


class Simulation:
    """A deterministic world: edges, coalescer shards, one pacer, `pools` Pools, optional metrics."""

    def __init__(
        self,
        seed: int | None = None,
        shards: int = 2,
        pacer: PacerSettings | None = None,
        flags: CoalescerFlags | None = None,
        latency_ms: tuple[float, float] = (0.5, 2.0),
        provider: str = "simulated",
        model: str = "sim-1",
        metrics: bool = False,
        max_events: int = 5_000_000,
        pools: int = 1,
        hosts: dict[str, str] | None = None,
        lease_slice: int = 0,
    ):
        if seed is None:
            seed = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else random.SystemRandom().randrange(2**32)
        self.seed = seed
        print(f"sluice simulation seed={seed}  (replay: {SEED_ENV}={seed})")
        self.rng = random.Random(seed)  # use it for random workloads too: they replay with the seed
        self.latency_ms = latency_ms
        self.provider, self.model, self.shards = provider, model, shards
        self.max_events = max_events
        self.now = 0.0
        self.events_run = 0
        self._queue: list = []
        self._seq = itertools.count()
        self._handled = itertools.count()
        self._last_arrival: dict[tuple[str, str], float] = {}
        self._link_delay_ms: dict[tuple[str, str], float] = {}
        self._request_ids = itertools.count(1)
        self._metrics_on = metrics
        self.trace: list[Delivery] = []
        self.leases: dict[str, Lease] = {}
        self.old_leases: dict[str, Lease] = {}  # those of dead Pacer incarnations
        self.clients: list[SimClient] = []
        self.nodes: dict[str, _Node] = {}
        self.lost = LostMembers()  # the Supervisor's deaths not announced yet (actors/member_loss.py)

        self.lease_slice = lease_slice  # SLUICE_LEASE_SLICE: grants a shard may hold ahead of demand
        self.pacer = PacerLogic(
            roles.pacer_account(roles.pacer_for(provider)),
            pacer or PacerSettings(),
            slice_size=lease_slice,
            me=roles.pacer_for(provider),
            new_lease_id=_counted_ids("g-1."),
            secret=SIM_SECRET,
        )
        self.coalescers = [
            CoalescerLogic(
                me=roles.coalescer(i),
                secret=SIM_SECRET,
                new_stream_id=_counted_ids(f"s-{i}.", roles.coalescer(i)),
                flags=replace(flags or CoalescerFlags()),
            )
            for i in range(shards)
        ]
        self.pool_roles = roles.pools(pools)
        self.hosts = dict(hosts or {})  # Pool role or edge name -> its host
        self.pool_hosts = {r: self.hosts.get(r, "") for r in self.pool_roles}
        self.pacer.pools = PoolChoice(self.pool_roles, self.pool_hosts)  # as the first Wire tells it
        self.pools = [SimPool(metrics, name=role) for role in self.pool_roles]
        self.pool = self.pools[0]  # Pool 0 ("pool"): the only one unless pools > 1
        for pool in self.pools:
            pool.orphan_s = pool.hub.orphan_s = orphan_after(self.pacer.settings.max_wait_s)  # as actors/pool.py
        self.edges: dict[str, SimEdge] = {}
        self.metrics = SimMetrics() if metrics else None
        self._add(roles.pacer_for(provider), _PacerHost(self.pacer, self))
        for logic in self.coalescers:
            self._add(logic.me, _CoalescerHost(logic))
        for pool in self.pools:
            self._add(pool.name, pool)
        if self.metrics:
            self._add("metrics", self.metrics)

    # --- the script ---------------------------------------------------------------------------
    def upstream(self, behaviour: Callable[[UpstreamRequest], Upstream] | Upstream | None = None, **fields) -> None:
        """Set how upstream calls behave: `Upstream` fields as keywords, an `Upstream`, or a
        function `(UpstreamRequest) -> Upstream` deciding per call."""
        for pool in self.pools:
            pool.behaviour = behaviour if behaviour is not None else Upstream(**fields)

    def client(
        self,
        at: float = 0.0,
        text: str = "hi",
        edge: str = "e1",
        disconnect_at: float | None = None,
        coalesce: bool = True,
        body: dict | None = None,
        model: str | None = None,
        thread: str | None = None,
    ) -> SimClient:
        """A client sending one chat request to `edge` at virtual time `at`."""
        body = body if body is not None else {"messages": [{"role": "user", "content": text}]}
        model = model or self.model
        key = coalescing_key(self.provider, model, body, thread) if coalesce else ""
        c = SimClient(f"r{next(self._request_ids)}", f"edge:{edge}", at, body, key, self.provider, model, disconnect_at)
        node = self._edge(edge)
        self.clients.append(c)
        self._schedule(at, self._deliver, node, None, _Arrive(c), None)
        if disconnect_at is not None:
            self._schedule(disconnect_at, self._deliver, node, None, _Disconnect(c), None)
        return c

    def burst(self, n: int, at: float = 0.0, spread_s: float = 0.0, **kwargs) -> list[SimClient]:
        """`n` clients at `at`, spread uniformly (seeded) over `spread_s` seconds."""
        return [self.client(at=at + self.rng.uniform(0.0, spread_s), **kwargs) for _ in range(n)]

    def disconnect(self, client: SimClient, at: float) -> None:
        self._schedule(at, self._deliver, self.nodes[client.edge], None, _Disconnect(client), None)

    def configure_pacer(self, at: float, **changes) -> None:
        """An operator's live `set` to the Pacer at `at` (like the admin message)."""
        self._schedule(at, self._deliver, self.nodes[roles.pacer_for(self.provider)], None, _Configure(changes), None)

    def set_flags(self, at: float, **changes) -> None:
        """An operator's live `set_flags` to every coalescer shard at `at`."""
        for i in range(self.shards):
            self._schedule(at, self._deliver, self.nodes[roles.coalescer(i)], None, _Configure(changes), None)

    def slow_link(self, src: str, dst: str, extra_ms: float) -> None:
        """Every message from `src` to `dst` (node names) takes `extra_ms` longer: opens the
        window of a race between two paths to the same node."""
        self._link_delay_ms[(src, dst)] = extra_ms

    def pause(self, node: str, at: float, for_s: float) -> None:
        """Freeze `node` ("pool", "coalescer:0", "pacer:simulated", "edge:e1") from `at` for
        `for_s`: what reaches it meanwhile (messages, timers) waits, then runs at once."""

        def start():
            n = self.nodes[node]
            n.paused_until = max(n.paused_until, self.now + for_s)
            self._schedule(n.paused_until, self._resume, n)

        self._schedule(at, start)

    def clock_jump(self, at: float, by_s: float, nodes: list[str] | None = None) -> None:
        """Step the wall clock the logic sees by `by_s` (either sign) on `nodes` (all by
        default) at `at`, like an NTP step. Timers keep their real durations."""

        def jump():
            for name in nodes or list(self.nodes):
                self.nodes[name].clock_offset += by_s

        self._schedule(at, jump)

    def kill(self, node: str, at: float, restart_s: float = 0.3) -> None:
        """SIGKILL `node` ("pool", "pool:<n>", "pacer:<account>", "coalescer:<n>") at `at`. What it held
        is lost; messages and timers addressed to it vanish. After `restart_s` (detection
        and a new process) the Supervisor's part: the replacement is wired (the Pacer
        learns the new Pool, edges the new hub or shard), then, once no killed node is
        still down, `MemberLost(role, old incarnation)` goes to the Pacer and every
        other shard (actors/member_loss.py, as actors/supervisor.py does)."""
        self._schedule(at, self._crash, node, restart_s)

    def _crash(self, name: str, restart_s: float) -> None:
        node = self.nodes[name]
        if node.down:
            return
        node.down, node.backlog = True, deque()
        lost = self._address(node)
        node.incarnation += 1
        pacer = roles.pacer_for(self.provider)
        if name in self.pool_roles:
            self._pool(name).crash(self.now)
            for edge in self.edges:
                self._schedule(
                    self.now + self._latency(), self._deliver, self._edge(edge), None, _HubLost(hub=name), None
                )
            self._tell(pacer, PoolAt(None, name))  # the Wire whose directory lacks that Pool
        elif name == pacer:
            for lease in self.leases.values():
                if lease.released_at is None:
                    lease.released_at, lease.released_by = self.now, "PacerLost"
            self.old_leases.update(self.leases)  # the new Pacer's leases are counted afresh
            self.leases = {}
            fresh = PacerLogic(
                self.pacer.provider,
                self.pacer.settings,
                slice_size=self.lease_slice,
                me=f"{name}@{node.incarnation}",
                new_lease_id=_counted_ids(f"g-{node.incarnation}."),
                secret=SIM_SECRET,
            )
            fresh.pools = self._pools_now()
            self.pacer, node.logic = fresh, _PacerHost(fresh, self)
        elif roles.is_coalescer(name):
            index = roles.coalescer_shard(name)
            old = self.coalescers[index]
            fresh = CoalescerLogic(
                me=f"{name}@{node.incarnation}",
                secret=SIM_SECRET,
                new_stream_id=_counted_ids(f"s-{index}@{node.incarnation}.", f"{name}@{node.incarnation}"),
                flags=replace(old.flags),
            )
            self.coalescers[index], node.logic = fresh, _CoalescerHost(fresh)
        else:
            self.fail(f"kill: {name} is not a Pool, Pacer or Coalescer shard")
        self.lost.died(name, lost)
        self._schedule(self.now + restart_s, self._restart, node)

    def _restart(self, node: _Node) -> None:
        node.down = False
        pacer = roles.pacer_for(self.provider)
        if node.name in self.pool_roles:
            pool = self._pool(node.name)
            pool.incarnation = f"{node.name}@{node.incarnation}"
            self._tell(pacer, PoolAt(pool.incarnation, node.name))
            for edge in self.edges:
                self._schedule(
                    self.now + self._latency(),
                    self._deliver,
                    self._edge(edge),
                    None,
                    _HubLost(up=True, hub=node.name),
                    None,
                )
        if node.name == pacer:
            # Wired with the directory as it is now (actors/pacer.py `on_wire`), not as it
            # was at the crash: a Pool replaced meanwhile told only the dead Pacer (seed 1019).
            for role, incarnation in self._pools_now().at.items():
                self._handle(node, None, PoolAt(incarnation, role), None)
        if roles.is_coalescer(node.name):
            for edge in self.edges:
                self._schedule(
                    self.now + self._latency(), self._deliver, self._edge(edge), None, _ShardMoved(node.name), None
                )
        if not any(n.down for n in self.nodes.values()):  # every member is up again: the announcement
            members = [pacer, *(roles.coalescer(i) for i in range(self.shards)), *self.pool_roles]
            for lost, targets in self.lost.announce(members):
                for target in targets:
                    self._send("supervisor", target, lost)

    def _pool(self, role: str) -> SimPool:
        return self.pools[self.pool_roles.index(role)]

    def _pools_now(self) -> PoolChoice:
        """Where every Pool is now, as a new Wire's directory says (None: down)."""
        choice = PoolChoice(self.pool_roles, self.pool_hosts)
        for pool in self.pools:
            choice.place(pool.name, None if self.nodes[pool.name].down else pool.incarnation)
        return choice

    @property
    def upstream_calls(self) -> int:
        """Upstream calls made, by every Pool."""
        return sum(pool.calls for pool in self.pools)

    def _tell(self, name: str, local) -> None:
        """A local event for `name` after one hop (the Wire's directory, as the host reads it)."""
        self._schedule(self.now + self._latency(), self._deliver, self.nodes[name], "supervisor", local, None)

    def _address(self, node: _Node) -> str:
        """The incarnation's address: what others hold (OpenStream.coalescer, a reply-to)."""
        if roles.is_coalescer(node.name):
            return self.coalescers[roles.coalescer_shard(node.name)].me
        if node.name in self.pool_roles:
            return self._pool(node.name).incarnation
        return node.name if node.incarnation == 1 else f"{node.name}@{node.incarnation}"

    def _latency(self) -> float:
        lo, hi = self.latency_ms
        return self.rng.uniform(lo, hi) / 1000.0

    def at(self, t: float, fn: Callable[[Simulation], None]) -> None:
        """Run `fn(sim)` at virtual time `t` (to add clients from a running scenario, ...)."""
        self._schedule(t, fn, self)

    # --- running -------------------------------------------------------------------------------
    def run(self, until: float | None = None, check: bool = True) -> Simulation:
        """Process events up to `until` (or until nothing is left). When nothing is left
        the system is quiescent and `check_invariants` runs (unless `check=False`)."""
        same_time, last_t = 0, None
        while self._queue and (until is None or self._queue[0][0] <= until):
            t, _seq, fn, args = heapq.heappop(self._queue)
            self.now = t
            fn(*args)
            self.events_run += 1
            same_time = same_time + 1 if t == last_t else 0
            last_t = t
            if self.events_run > self.max_events:
                self.fail(f"still busy after {self.max_events} events (livelock?)")
            if same_time > 100_000:
                self.fail(f"100000 events at t={t} without time advancing (livelock)")
        if until is not None:
            self.now = max(self.now, until)
        if check and not self._queue:
            self.check_invariants()
        return self

    @property
    def quiescent(self) -> bool:
        return not self._queue

    def fail(self, what: str) -> None:
        tail = "\n".join(
            f"  {d.sent_at:10.6f} -> {d.delivered_at}  {d.src} -> {d.dst}: {d.msg}" for d in self.trace[-8:]
        )
        raise SimulationError(
            f"[seed={self.seed}] t={self.now:.6f}: {what}\n"
            f"replay: {SEED_ENV}={self.seed} pytest ...\nlast messages:\n{tail}"
        )

    def expect(self, condition: bool, what: str) -> None:
        """`assert` for scenario code: a failure names the seed to replay."""
        if not condition:
            self.fail(what)

    # --- observations -------------------------------------------------------------------------
    def messages(
        self, kind: type | tuple | None = None, src: str | None = None, dst: str | None = None
    ) -> list[Delivery]:
        """Messages that crossed the network, in sending order, filtered."""
        return [
            d
            for d in self.trace
            if (kind is None or isinstance(d.msg, kind))
            and (src is None or d.src == src)
            and (dst is None or d.dst == dst)
        ]

    def count(self, control_only: bool = True) -> Counter:
        """Messages sent, by type name (the control plane only, by default)."""
        return Counter(type(d.msg).__name__ for d in self.trace if not (control_only and isinstance(d.msg, DATA_PLANE)))

    def grants(self) -> list[tuple[float, str]]:
        """(time, lease_id) of every lease the Pacer granted, in order. A slice grant counts
        when its shard used it (its OpenStream left the shard); one given back unused does
        not count."""
        used = {
            d.msg.lease_id: d.sent_at
            for d in self.trace
            if isinstance(d.msg, m.OpenStream) and roles.is_coalescer(d.src.partition("@")[0])
        }
        return sorted(
            (used.get(lease.lease_id, lease.granted_at), lease.lease_id)
            for lease in self.leases.values()
            if lease.released_by != "SliceReport"
        )

    def check_invariants(self) -> None:
        """What must hold when the system is quiet; raises SimulationError naming the seed."""
        for c in self.clients:
            if len(c.outcomes) != 1:
                self.fail(f"client {c.request_id} on {c.edge} ended {len(c.outcomes)} times: {c.outcomes} ({c.events})")
            terminals = [i for i, e in enumerate(c.events) if ev.is_terminal(e)]
            if len(terminals) > 1 or (terminals and terminals[0] != len(c.events) - 1):
                self.fail(f"client {c.request_id}: terminal event not last and only: {c.events}")
            if c.outcome in ("done", "error", "cancelled") and not terminals:
                self.fail(f"client {c.request_id} ended {c.outcome} without a terminal event")
            if c.outcome == "rejected" and c.events:
                self.fail(f"client {c.request_id} rejected but received events")
            if c.stream_id is not None and c.events:
                # What each hub that held the stream published (a dead Pool incarnation's too).
                candidates = [p for pool in self.pools for p in pool.published.get(c.stream_id, [])] or [[]]
                if c.hub_lost and c.events[-1].get("code") != "hub_disconnected":
                    self.fail(f"client {c.request_id} lost its hub but ended {c.events[-1]}")
                expected = [
                    p[-1:]
                    if c.replayed
                    else p[: len(c.events) - 1] + c.events[-1:]
                    if c.hub_lost  # what the dead hub sent, then the edge's error
                    else p[: len(c.events)]
                    for p in candidates
                ]
                if c.events not in expected:
                    self.fail(f"client {c.request_id} got {c.events}, but stream {c.stream_id} published {candidates}")
        pacer = self.pacer.state(self.now + self.nodes[roles.pacer_for(self.provider)].clock_offset)
        if pacer["in_flight"] or pacer["held"] or pacer["queue_depth"]:
            self.fail(f"pacer not idle at quiescence: {pacer}")
        for logic in self.coalescers:
            if logic.by_key or logic.by_stream:
                self.fail(f"{logic.me} still holds flights: {logic.state(self.now)['in_flight']}")
            if logic.errors:
                self.fail(f"{logic.me} still remembers errors past their TTL: {list(logic.errors)}")
        for pool in self.pools:
            if pool.running or pool.logic.calls:
                self.fail(f"{pool.name} still running {sorted(pool.running)} (its logic: {sorted(pool.logic.calls)})")
        for edge in self.edges.values():
            lg = edge.logic
            listening = {hub: ls.streams() for hub, ls in edge.listeners_at.items() if ls}
            if lg.by_key or lg.submits or lg.by_request or lg.flight_of or edge.waiting or listening:
                self.fail(
                    f"{edge.name} still holds state: flights={list(lg.by_key)} submits={list(lg.submits)} clients={list(lg.by_request)} listeners={listening}"
                )
        # Routing: a stream runs on one Pool, and every client of it listened at that Pool's hub.
        ran_on: dict[str, set] = {}
        for pool in self.pools:
            for call in pool.log:
                ran_on.setdefault(call.stream_id, set()).add(pool.name)
        for stream_id, where in ran_on.items():
            if len(where) > 1:
                self.fail(f"stream {stream_id} ran on several Pools: {sorted(where)}")
        for c in self.clients:
            if c.stream_id in ran_on and not c.replayed and c.flight is not None:
                listened = c.flight.hub or roles.POOL
                if listened not in ran_on[c.stream_id]:
                    self.fail(
                        f"client {c.request_id} listened at {listened}, but {c.stream_id} ran on {sorted(ran_on[c.stream_id])}"
                    )
        opened = {call.stream_id: call for pool in self.pools for call in pool.log}
        failed = {item for pool in self.pools for item in pool.failed}
        for lease in self.leases.values():
            if lease.released_at is None:
                self.fail(f"lease {lease.lease_id} granted at {lease.granted_at} never released")
            if lease.released_by in ("MemberLost", "PacerLost"):
                continue  # reclaimed from, or lost with, a dead process
            call = opened.get(lease.lease_id)
            # A call that ran gives its lease back when it ends, unless everyone left before
            # the Coalescer saw the grant: then its LeaseCancel (sent with a FailStream, which
            # stops the call if it is still running) may reach the Pacer first.
            allowed = {"LeaseCancel"} if call is None else {"LeaseRelease"}
            if call is None:
                allowed.add("SliceReport")  # a slice grant given back unused
            if lease.lease_id in self.old_leases or any(sid == lease.lease_id for sid, _ in failed):
                allowed.add("LeaseRelease")  # a re-grant of a finished stream, given back by the Pool
            if call is not None and (lease.lease_id, "cancelled") in failed:
                allowed.add("LeaseCancel")
            if lease.released_by not in allowed:
                self.fail(
                    f"lease {lease.lease_id} released by {lease.released_by}, expected {' or '.join(sorted(allowed))}"
                )
        for call in opened.values():
            if call.outcome == "lost":
                continue
            if call.stream_id not in self.leases and call.stream_id not in self.old_leases:
                self.fail(f"upstream call {call.stream_id} ran without a lease")

    def _no_listener(self, stream_id: str) -> None:
        """Safety: the upstream call is aborted only when no client anywhere still listens."""
        for edge in self.edges.values():
            for client in edge.clients:
                flight = client.flight
                if flight is not None and flight.stream_id == stream_id and client in flight.clients:
                    self.fail(f"pool aborts {stream_id} while client {client.request_id} on {edge.name} listens")

    # --- the machinery -------------------------------------------------------------------------
    def _add(self, name: str, logic) -> _Node:
        node = self.nodes[name] = _Node(name, logic)
        return node

    def _edge(self, name: str) -> _Node:
        role = f"edge:{name}"
        if role not in self.nodes:
            self.edges[name] = SimEdge(name, self.shards, self._metrics_on, self.hosts.get(name, ""))
            self._add(role, self.edges[name])
        return self.nodes[role]

    def _schedule(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), fn, args))

    def _deliver(self, node: _Node, sender, msg, delivery: Delivery | None, incarnation: int | None = None) -> None:
        if node.down or (incarnation is not None and incarnation != node.incarnation):
            return  # addressed to a dead process: lost
        if self.now < node.paused_until or node.backlog:
            node.backlog.append((sender, msg, delivery))
            return
        self._handle(node, sender, msg, delivery)

    def _resume(self, node: _Node) -> None:
        while node.backlog and self.now >= node.paused_until:
            self._handle(node, *node.backlog.popleft())

    def _handle(self, node: _Node, sender, msg, delivery: Delivery | None) -> None:
        if delivery is not None:
            delivery.delivered_at, delivery.order = self.now, next(self._handled)
        if (
            isinstance(msg, (m.AbortStream, m.FailStream))
            and isinstance(node.logic, SimPool)
            and msg.stream_id in node.logic.running
        ):
            if getattr(msg, "code", None) != "coalescer_lost":  # that one fails listened streams on purpose
                self._no_listener(msg.stream_id)
        try:
            effects = node.logic.handle(msg, sender, self.now + node.clock_offset)
        except SimulationError:
            raise
        except Exception as exc:
            self.fail(f"{node.name} raised {type(exc).__name__}: {exc} while handling {msg!r}")
            raise  # unreachable: fail() raises
        for effect in effects or ():
            if isinstance(effect, Send):
                self._send(self._address(node) if roles.is_coalescer(node.name) else node.name, effect.to, effect.msg)
            elif isinstance(effect, After):
                self._schedule(
                    self.now + max(0.0, effect.delay_s), self._deliver, node, None, effect.msg, None, node.incarnation
                )
            else:
                self.fail(f"{node.name} returned {effect!r}, not Send/After")

    def _send(self, src: str, to, msg) -> None:
        dst = self.nodes.get(to) if isinstance(to, str) else None
        # A role resolves when sent (the host reads its directory): to the incarnation
        # playing it now; if that one dies before the message arrives, the message is lost.
        incarnation = dst.incarnation if dst is not None else None
        if dst is not None and dst.down:
            incarnation = -1  # nobody plays the role now (not in the directory): lost
        if dst is None and isinstance(to, str) and "@" in to:  # one incarnation's address
            name, _, number = to.partition("@")
            dst, incarnation = self.nodes.get(name), int(number)
        elif dst is not None and roles.is_coalescer(to) and src != "supervisor" and not src.startswith("edge:"):
            incarnation = 1  # a reply to, or StreamFinished for, the first shard's address
        if dst is None:
            self.fail(f"{src} sent {type(msg).__name__} to unknown address {to!r}")
        try:
            data = m.encode(msg)
        except Exception as exc:
            self.fail(f"{src} -> {to}: {type(msg).__name__} does not encode: {exc}")
        copy = m.decode(data)
        if isinstance(copy, m.Invalid) or copy != msg:
            self.fail(f"{src} -> {to}: {msg!r} does not survive the codec: {copy!r}")
        delivery = Delivery(self.now, src, to, copy)
        self.trace.append(delivery)
        lo, hi = self.latency_ms
        delay_ms = self.rng.uniform(lo, hi) + self._link_delay_ms.get((src, to), 0.0)
        arrival = max(self.now + delay_ms / 1000.0, self._last_arrival.get((src, to), 0.0))
        self._last_arrival[(src, to)] = arrival
        self._schedule(arrival, self._deliver, dst, src, copy, delivery, incarnation)
