"""The Coalescer's logic: one small state machine per coalescing key (singleflight).

    Submit(key)  no flight  -> new flight, leader; ask the Pacer for a lease  (asking)
                               (the request carries the call: on grant the Pacer
                               sends OpenStream to the Pool itself)
                 in flight  -> follower; add a reference for the submitting edge
    LeaseQueued             -> admit everyone waiting                         (queued)
    LeaseGranted            -> admit everyone waiting; the Pool has the call  (streaming)
    LeaseDenied             -> reject everyone waiting (429); the Pacer ends the stream of
                               a queued one (the admitted listen at the hub)
    LeaseFallback           -> ask the fallback provider's Pacer instead, same stream id
                               (the flight keeps its key: followers get the fallback's answer)
    Cancel(edge)            -> drop one reference; the last one aborts the upstream call
                               (asking/queued: gives the lease back and fails the stream,
                               which also ends a call the Pacer's grant already started)
    StreamFinished          -> forget the flight; an error is remembered for `error_ttl_s`
                               and replayed to identical requests without an upstream call

References are counted per edge process, not per client: an edge joins identical local
requests itself and holds one reference per `Admitted` it received, so a burst of N
identical requests on one edge costs O(1) messages here. The flight belongs to the key,
not to the leader, so a leader that leaves hands the stream to the followers for free.

With several Pools, the Pacer names the one that runs the call in `LeaseQueued.hub` /
`LeaseGranted.hub` (or the Pool itself in `StreamFinished.hub`, when the call ended before
the grant arrived here); every `Admitted` names it (`hub`), so every edge subscribes at
that Pool's stream hub, followers admitted later included; aborts and fails go to that
Pool, and asking again (a fallback, a replaced Pacer) keeps it (`LeaseRequest.hub`).

When a process dies (`MemberLost`, docs/reliability.md): a dead Pool's streaming flights
are forgotten at once (their clients already got `hub_disconnected`; nothing is kept for
the error TTL, so the next identical request starts a fresh call), flights still
asking or queued at a dead Pacer ask its replacement again, and a dead edge worker's
references are dropped as if it had cancelled them (`MemberLost(edge, edge_id)`).

Lease slices (actors/lease_slices.py, SLUICE_LEASE_SLICE): a new flight whose Pacer
handed this shard a grant ahead of demand opens its call here -- OpenStream to the
grant's Pool, then Admitted -- with no LeaseRequest; the stream id is the grant's lease id,
so the Pool's LeaseRelease finds the lease at the Pacer as for any other call.

A request with an empty key (non-idempotent: tools, or the client opted out) or any
request while coalescing is disabled gets a flight of its own.

Stream ids are random (`auth.unguessable_id`), never derived from the request id the
client sees, and name this shard incarnation (`protocols/stream_ids.py`: the hub ends the
streams a dead shard left unopened, which a Pacer that died with it cannot tell anyone).
Every `Admitted` carries the ticket (`auth.ticket`) that lets the submitting edge -- and
only that edge -- subscribe to the stream at the hub.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from actors.lease_slices import HeldSlices, SliceIdle
from protocols import auth, roles, stream_ids
from protocols import messages as m
from protocols.effects import After, Send
from protocols.settings import CoalescerFlags, flags_from

ASKING, QUEUED, STREAMING = "asking", "queued", "streaming"


@dataclass(frozen=True, slots=True)
class ForgetError:
    """Timer: the error remembered for `key` has outlived its TTL."""

    key: str


@dataclass
class Flight:
    """A key's upstream call as the Coalescer sees it. The request (with its body) is
    kept only until the grant, to ask a replacement Pacer again if the Pacer dies; after
    the grant the Pool has it."""

    key: str
    stream_id: str
    provider: str
    phase: str = ASKING
    refs: Counter = field(default_factory=Counter)  # edge_id -> Admitted replies held
    waiting: list = field(default_factory=list)  # (sender, request_id, edge_id, role)
    request: m.LeaseRequest | None = None  # until the grant
    pool: str = ""  # the Pool incarnation the grant opened the call on
    hub: str = ""  # the role of the Pool that runs it (its clients listen at its hub); "" until the Pacer says


@dataclass
class CoalescerLogic:
    """`me` is this shard's own address string, given to the Pool for StreamFinished;
    `secret` the cluster secret the tickets are signed with (the actor host sets it from
    actors/secret.py; the simulation uses a fixed one)."""

    me: str = ""
    secret: bytes = b""
    # None in production: random, tagged with this incarnation (protocols/stream_ids.py, so
    # the hub can end what it leaves unopened if it dies); the simulation gives a counter
    # (tagged the same way) so a run replays from its seed.
    new_stream_id: Callable[[], str] | None = None
    flags: CoalescerFlags = field(default_factory=CoalescerFlags)
    by_key: dict = field(default_factory=dict)
    by_stream: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # key -> (error event, expires_at, stream_id)
    leaders_total: int = 0
    followers_total: int = 0
    slices: HeldSlices = field(default_factory=HeldSlices)
    # Pacer role -> this shard's flights waiting for a lease from it (asking or queued), so a
    # new leader learns in O(1) whether it may take a slice grant (`_waits_at`); kept by
    # `_recount` at every change of a flight's phase, provider or life.
    asking: Counter = field(default_factory=Counter)
    _asking_at: dict = field(default_factory=dict)  # stream id -> the Pacer role it counts at

    def __post_init__(self) -> None:
        self.slices.me = self.me

    def set_flags(self, changes: dict) -> None:
        """An operator's live `set_flags` (the admin command; the simulator's `set_flags`):
        ValueError names the bad flag or value, and then no flag changes."""
        self.flags = flags_from(self.flags, changes)

    def handle(self, msg: Any, sender: Any, now: float) -> list:
        if isinstance(msg, m.Submit):
            return self._submit(msg, sender, now)
        if isinstance(msg, (m.LeaseQueued, m.LeaseGranted, m.LeaseDenied)):
            return self._lease_answer(msg, sender)
        if isinstance(msg, m.LeaseFallback):
            return self._fall_back(msg, now)
        if isinstance(msg, m.Cancel):
            return self._cancel(msg)
        if isinstance(msg, m.StreamFinished):
            return self._finished(msg, now)
        if isinstance(msg, m.MemberLost):
            return self._member_lost(msg, now)
        if isinstance(msg, m.SliceGrant):
            return self.slices.receive(msg.role, msg, now)
        if isinstance(msg, m.SliceRecall):
            return self.slices.recall(msg.role)
        if isinstance(msg, SliceIdle):
            return self.slices.idle(msg, now)
        if isinstance(msg, ForgetError):
            entry = self.errors.get(msg.key)
            if entry and entry[1] <= now + 1e-9:
                del self.errors[msg.key]
            elif entry:  # the timer beat the wall clock (a clock step back): try again later
                return [After(entry[1] - now, ForgetError(msg.key))]
            return []
        return []

    # --- admission ------------------------------------------------------------------------
    def _submit(self, msg: m.Submit, sender: Any, now: float) -> list:
        key = msg.key if (msg.key and self.flags.coalesce_enabled) else f"solo:{msg.request_id}"
        remembered = self.errors.get(key)
        if remembered and remembered[1] > now:
            self.followers_total += 1
            return [Send(sender, self._admitted(msg.request_id, remembered[2], "follower", msg.edge_id, remembered[0]))]
        flight = self.by_key.get(key)
        if flight is not None:
            self.followers_total += 1
            flight.refs[msg.edge_id] += 1
            if flight.phase == ASKING:
                flight.waiting.append((sender, msg.request_id, msg.edge_id, "follower"))
                return []
            return [
                Send(sender, self._admitted(msg.request_id, flight.stream_id, "follower", msg.edge_id, hub=flight.hub))
            ]
        self.leaders_total += 1
        pacer = roles.pacer_for(msg.provider)
        grant, report = (None, []) if self._waits_at(pacer) else self.slices.take(pacer, now, msg.host)
        flight = Flight(key, grant.lease_id if grant else self._new_stream_id(), msg.provider)
        flight.refs[msg.edge_id] += 1
        self.by_key[key] = flight
        self.by_stream[flight.stream_id] = flight
        if grant is not None:
            # Granted from this shard's slice: the call goes to the Pool from here.
            flight.phase, flight.pool, flight.hub = STREAMING, grant.pool, grant.hub
            sid = flight.stream_id
            opened = m.OpenStream(
                sid, msg.provider, msg.model, msg.body, sid, 0.0, self.me, grant.key, grant.keys, "", grant.pool
            )
            admitted = self._admitted(msg.request_id, sid, "leader", msg.edge_id, hub=grant.hub)
            return [Send(grant.hub, opened), Send(sender, admitted), *report]
        flight.waiting.append((sender, msg.request_id, msg.edge_id, "leader"))
        self._recount(flight)
        # The leader's host goes with the request: the Pacer prefers a Pool there, so its
        # tokens need not cross hosts (followers elsewhere listen at that Pool's hub).
        flight.request = m.LeaseRequest(
            flight.stream_id, msg.provider, now, msg.model, msg.body, self.me, host=msg.host
        )
        return [Send(pacer, flight.request)]

    def _new_stream_id(self) -> str:
        return self.new_stream_id() if self.new_stream_id is not None else stream_ids.new(self.secret, self.me)

    def _waits_at(self, pacer: str) -> bool:
        """Does a flight of this shard wait for a lease from `pacer`? Then a new one queues
        behind it rather than overtake it with a slice grant."""
        return self.asking.get(pacer, 0) > 0

    def _recount(self, flight: Flight) -> None:
        """Keep `asking` true for `flight` after its phase, its provider (a fallback) or its
        life (forgotten) changed: counted at its Pacer while it waits for a lease there."""
        waits = flight.phase != STREAMING and self.by_stream.get(flight.stream_id) is flight
        pacer = roles.pacer_for(flight.provider) if waits else None
        counted = self._asking_at.get(flight.stream_id)
        if counted == pacer:
            return
        if counted is not None:
            self.asking[counted] -= 1
            if self.asking[counted] <= 0:
                del self.asking[counted]
            del self._asking_at[flight.stream_id]
        if pacer is not None:
            self.asking[pacer] += 1
            self._asking_at[flight.stream_id] = pacer

    def _lease_answer(self, msg: Any, sender: Any) -> list:
        flight = self.by_stream.get(msg.lease_id)
        if flight is None:
            # Everyone left (the LeaseCancel went with the FailStream), or the call the grant
            # opened has already finished: the lease is accounted for either way.
            return []
        out: list = []
        if isinstance(msg, m.LeaseDenied):
            self._forget(flight)
            for sender, request_id, _edge, _role in flight.waiting:
                out.append(Send(sender, m.Rejected(request_id, msg.status, msg.code, msg.message, msg.retry_after_s)))
            if flight.phase == QUEUED and flight.hub:
                # Its admitted clients listen at its hub. The Pacer ends the stream there too,
                # but a Pacer that does not know that Pool (`pool_lost`) has no address for
                # it; the hub takes the second FailStream as a no-op.
                out.append(Send(flight.hub, m.FailStream(flight.stream_id, msg.code, msg.message)))
            return out
        if isinstance(msg, m.LeaseGranted):
            flight.phase = STREAMING  # the Pacer sent the Pool its OpenStream with the grant
            flight.pool, flight.request = msg.pool, None
        else:
            flight.phase = QUEUED
        self._recount(flight)
        flight.hub = msg.hub or flight.hub
        for sender, request_id, edge_id, role in flight.waiting:
            out.append(Send(sender, self._admitted(request_id, flight.stream_id, role, edge_id, hub=flight.hub)))
        flight.waiting.clear()
        return out

    def _fall_back(self, msg: m.LeaseFallback, now: float) -> list:
        """The Pacer cannot serve the call: ask the fallback's Pacer, same stream id. The
        key stays the original request's, so identical requests keep joining this flight
        and get the fallback's answer; those admitted already keep listening."""
        flight = self.by_stream.get(msg.lease_id)
        if flight is None or flight.request is None:
            return []
        old = flight.request
        flight.provider = msg.provider
        self._recount(flight)  # it waits at the fallback's Pacer now
        # Same Pool: those admitted already listen at its hub.
        flight.request = m.LeaseRequest(
            old.lease_id,
            msg.provider,
            now,
            msg.model,
            old.body,
            self.me,
            msg.fallback_from,
            list(msg.fallbacks),
            flight.hub,
            old.host,
        )
        return [Send(roles.pacer_for(msg.provider), flight.request)]

    # --- leaving and ending -------------------------------------------------------------
    def _cancel(self, msg: m.Cancel) -> list:
        flight = self.by_stream.get(msg.stream_id)
        if flight is None or flight.refs[msg.edge_id] <= 0:
            return []
        flight.refs[msg.edge_id] -= 1
        if flight.refs[msg.edge_id] <= 0:
            del flight.refs[msg.edge_id]
        if flight.refs:
            return []
        self._forget(flight)
        pool = flight.hub or roles.POOL
        if flight.phase == STREAMING:
            return [Send(pool, m.AbortStream(flight.stream_id, msg.requested_at))]
        return [
            Send(roles.pacer_for(flight.provider), m.LeaseCancel(flight.stream_id)),
            Send(pool, m.FailStream(flight.stream_id, "cancelled", "cancelled before the upstream call started")),
        ]

    def _finished(self, msg: m.StreamFinished, now: float) -> list:
        flight = self.by_stream.get(msg.stream_id)
        out: list = []
        if flight is not None:
            self._forget(flight)
            # A call can end before its grant reaches us (the Pacer told the Pool and us at
            # once): those still waiting are admitted now and get the whole stream replayed
            # from the hub of the Pool that ran it.
            flight.hub = msg.hub or flight.hub
            for sender, request_id, edge_id, role in flight.waiting:
                out.append(Send(sender, self._admitted(request_id, flight.stream_id, role, edge_id, hub=flight.hub)))
        if msg.outcome != "error" or flight is None or flight.key.startswith("solo:"):
            return out
        ttl = self.flags.error_ttl_s
        if ttl <= 0:
            return out
        self.errors[flight.key] = (
            msg.error or {"type": "error", "code": "upstream_error", "message": ""},
            now + ttl,
            msg.stream_id,
        )
        return out + [After(ttl, ForgetError(flight.key))]

    # --- crashes of others -----------------------------------------------------------------
    def _member_lost(self, msg: m.MemberLost, now: float) -> list:
        out: list = []
        if roles.is_pool(msg.role):
            self.slices.pool_lost(msg.incarnation)
            # Only that Pool's flights: the other Pools' streams go on untouched.
            for flight in [f for f in self.by_stream.values() if f.phase == STREAMING and f.pool == msg.incarnation]:
                self._forget(flight)  # not remembered as an error: a new request is a new call
                # An edge admitted just before the crash may subscribe at the new hub: it
                # gets this error instead of waiting for a stream that will never open.
                out.append(
                    Send(
                        msg.role,
                        m.FailStream(
                            flight.stream_id, "pool_lost", "the upstream connection pool restarted mid-stream; retry"
                        ),
                    )
                )
        elif roles.is_pacer(msg.role):
            self.slices.pacer_lost(msg.incarnation)
            for flight in self.by_stream.values():
                if (
                    flight.phase != STREAMING
                    and flight.request is not None
                    and roles.pacer_for(flight.provider) == msg.role
                ):
                    # The replacement queues it anew, on the Pool its clients listen at.
                    out.append(Send(msg.role, replace(flight.request, hub=flight.hub)))
        elif msg.role == roles.EDGE:
            out += self._edge_lost(msg.incarnation, now)
        return out

    def _edge_lost(self, edge_id: str, now: float) -> list:
        """A dead edge process (here `incarnation` is its edge id) listens to nothing: its
        references go as if it had cancelled each of them at once, so a call only it
        listened to is aborted and its lease returns; a call others hold goes on."""
        out: list = []
        for flight in list(self.by_stream.values()):
            flight.waiting = [w for w in flight.waiting if w[2] != edge_id]
            if flight.refs[edge_id] > 0:
                flight.refs[edge_id] = 1
                out += self._cancel(m.Cancel(flight.stream_id, edge_id, now))
            else:
                flight.refs.pop(edge_id, None)
        return out

    def _forget(self, flight: Flight) -> None:
        self.by_stream.pop(flight.stream_id, None)
        if self.by_key.get(flight.key) is flight:
            del self.by_key[flight.key]
        self._recount(flight)

    def _admitted(
        self, request_id: str, stream_id: str, role: str, edge_id: str, error: dict | None = None, hub: str = ""
    ) -> m.Admitted:
        """The answer to `edge_id`'s Submit, with the ticket for that edge (each edge its own)."""
        return m.Admitted(
            request_id,
            stream_id,
            role,
            error,
            self.flags.coalesce_enabled,
            self.flags.stream_fanout_enabled,
            auth.ticket(self.secret, stream_id, edge_id),
            hub,
        )

    # --- admin ------------------------------------------------------------------------------
    def state(self, now: float) -> dict:
        return {
            "flags": {
                "coalesce_enabled": self.flags.coalesce_enabled,
                "stream_fanout_enabled": self.flags.stream_fanout_enabled,
                "error_ttl_s": self.flags.error_ttl_s,
            },
            "in_flight": [
                {
                    "key": f.key[:16],
                    "stream_id": f.stream_id,
                    "phase": f.phase,
                    "hub": f.hub,
                    "edge_refs": sum(f.refs.values()),
                }
                for f in self.by_key.values()
            ],
            "errors_remembered": sum(1 for e in self.errors.values() if e[1] > now),
            "leaders_total": self.leaders_total,
            "followers_total": self.followers_total,
            "slices": self.slices.state(),
            "slice_grants_used_total": self.slices.used_total,
        }
