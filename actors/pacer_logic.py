"""The Pacer's logic: a token bucket, an in-flight cap, a per-minute cap (per API key) and a FIFO queue.

One Pacer per upstream account. Only upstream calls ask for a lease (coalesced followers
never reach the Pacer). A lease is granted on a key when all of these hold for that key:

    now >= paused_until                 (an upstream 429 Retry-After pauses grants)
    its in-flight calls < concurrency   (CONCURRENCY)
    tokens >= 1                         (bucket refills at RPS per second up to BURST)
    grants in the last 60 s < rpm       (RPM, optional; Perplexity tier 0 is 50/min)
    its circuit allows a call           (closed, or half-open with no probe out)

and nobody is ahead in the queue (FIFO). A grant sends the call the request carries to
the Pool (`OpenStream`) and `LeaseGranted` to the Coalescer. A request that cannot be
granted waits in the queue; when the queue holds `max_queue` leases, or a lease waited
`max_wait_s`, it is denied with 429 and a Retry-After estimated from the bucket. A request
that cannot be granted before its `max_wait_s` is up -- every key paused past it by a
provider's 429 with a long Retry-After, or the per-minute cap full for longer -- is denied
so at once, new or queued, rather than kept waiting for a certain 429 (`_doomed`). Settings change live (`configure`), and
the change applies to the queue already waiting.

An account may have several API keys: each has its own bucket, per-minute cap,
concurrency, 429 pause and circuit breaker (`KeyBucket`, actors/key_choice.py, with the
account's settings), and a grant goes out on whichever key can grant (the least loaded,
round-robin among equals), named in the `OpenStream`. The Pool reports each key's verdict
in `LeaseRelease.key_results`, which drives that key's circuit (actors/circuit.py). When
every key's circuit is open, requests (new and queued) go to the account's fallbacks
(`LeaseFallback` to the shard) or are denied at once with 503 `upstream_unavailable`; a
queue past `fallback_queue` also sends new requests to a fallback (docs/reliability.md,
"Fallbacks and circuit breakers").

With several Pools (`SLUICE_POOLS`), each request is given its Pool when it arrives
(`actors/pool_choice.py`: the least loaded, counting this Pacer's granted and queued
calls), named in `LeaseQueued.hub` / `LeaseGranted.hub` (its clients listen at that Pool's
hub), and its grant goes there. A request that names a Pool (`LeaseRequest.hub`: asked
again for a flight whose clients listen already) keeps it; one naming a Pool this Pacer
does not know (gone with its host) is refused at once, `pool_lost` (`_pool_gone`). With
several hosts the choice prefers a Pool on the host where the flight's first client
arrived (`LeaseRequest.host`; each Pool's host is in the Supervisor's Wire, `PoolAt.host`),
unless those are much more loaded than the others (pool_choice.py `spill`).

Every lease belongs to the process incarnations it involves: the Pool incarnation its
call was sent to (learnt from the directory: `PoolAt`) and the Coalescer shard that
asked. `MemberLost` for one of them reclaims what it held at once (docs/reliability.md):
a dead Pool's leases come back and the requests queued for it are denied (their clients
listened at its hub), a dead shard's queued requests are dropped and its granted calls
are failed. No grant is made on a Pool that is down: the request at the head of the queue
waits for its replacement, and those behind it wait in order. A denied request whose
clients were admitted (queued here, or one that names its hub: asked again after this
Pacer replaced a dead one, or a fallback) has its stream ended at that hub (`FailStream`),
since the shard answers only clients still waiting for it.

Lease slices (`slice_size` > 0, SLUICE_LEASE_SLICE; docs/architecture.md, "Lease slices"):
a shard that asks for a lease again within SLICE_DEMAND_S and is granted it at once, or
that reports the grants it used (`SliceReport(refill)`), is handed up to `slice_size`
grants ahead of demand (`SliceGrant`), each a lease in `in_flight` held
by that shard (`_Held.sliced`: "held" until reported used -- by the Pool that opened its
call, `SliceOpened` / `LeaseRelease.opened`, at most OPENED_FLUSH_S late, or by the
shard's `SliceReport`, whichever comes first -- then "used" until its call's
LeaseRelease), with its token and per-minute place taken from surplus only (key_choice.py
`can_slice`). The shard opens a call with one itself: OpenStream to the Pool, Admitted to
the edges, nothing to the Pacer. Everything that must stop grants recalls the slices
(`SliceRecall`): a request that has to queue (so the head of the queue gets them first),
any change of a key's circuit, a 429 pause, a settings change; no slice is handed out while
anything waits. A dead shard's grants are reclaimed like its leases (`MemberLost`). A
grant's id (the stream id of the call it opens) is tagged with the shard it is handed to
(protocols/stream_ids.py), so the hub ends its stream if that shard dies before opening
it, even when this Pacer died with it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from actors.circuit import HALF_OPEN, OPEN, STATE_VALUE, CircuitSettings
from actors.key_choice import KeyBucket, choose, retry_order
from actors.pool_choice import PoolChoice
from protocols import auth, roles, stream_ids
from protocols import messages as m
from protocols.effects import After, Send
from protocols.settings import SETTING_TYPES, PacerSettings, settings_from

log = logging.getLogger("sluice.pacer")

# Float slack for boundaries: a timer set for exactly "the wait is over" computes its delay
# as boundary - now, and now + delay can land an ulp short of the boundary. Without slack
# the tick finds nothing to do, re-arms for ~0 s and spins until the clock moves on (in
# a simulation with a virtual clock: forever).
EPS = 1e-9
# A shard is cut a slice when it asks for a lease twice within this long (it has demand);
# as long as a shard's idle slice is kept (actors/lease_slices.py IDLE_S).
SLICE_DEMAND_S = 2.0
# The longest a provider's Retry-After pauses a key. One 429 saying 1,000,000 s (a bug, a
# ms/s mix-up) paused the key for 11.6 days, every request refused at once until the Pacer
# restarted; past this the key is tried again, and a provider that still refuses pauses it
# again, at the cost of one call per pause. Rate limits are per minute; a daily quota
# costs one call every 5 minutes.
LONGEST_PAUSE_S = 300.0


@dataclass(frozen=True, slots=True)
class Tick:
    """Timer: re-check the queue (a token arrived, a pause ended, a wait expired)."""

    generation: int


@dataclass(frozen=True, slots=True)
class PoolAt:
    """Local (never on the wire): the directory says the Pool `role` is now at
    `incarnation` (None: it is down; grants on it wait), on `host` (the cluster host it
    runs on, placement HOST name; "": not said)."""

    incarnation: str | None
    role: str = roles.POOL
    host: str = ""


@dataclass(frozen=True, slots=True)
class _Held:
    """A granted lease and who holds it."""

    granted_at: float
    pool: str | None  # the Pool incarnation its OpenStream went to
    asker: str  # the Coalescer shard (address) that asked
    key: int = 0  # the API key (index) it was granted on
    probe: bool = False  # the half-open probe of that key's circuit
    hub: str = roles.POOL  # the role of the Pool its OpenStream went to
    sliced: str = ""  # a slice grant: "held" (by `asker`, unused as far as we know) | "used"


@dataclass
class _Waiter:
    lease_id: str
    requester: object
    enqueued_at: float
    request: m.LeaseRequest
    hub: str = roles.POOL  # the Pool (role) chosen for it: its clients listen at that hub
    pool: str | None = None  # that Pool's incarnation when it was chosen


@dataclass
class PacerLogic:
    """`keys`: the account's API keys (one bucket and circuit each); `fallbacks`: the
    [provider, model] alternatives of this account, `fallback_queue` the queue depth from
    which new requests go to them (0: only when every circuit is open)."""

    provider: str
    settings: PacerSettings = field(default_factory=PacerSettings)
    keys: int = 1
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    fallbacks: list = field(default_factory=list)
    fallback_queue: int = 0
    slice_size: int = 0  # grants a shard may hold ahead of demand (0: no slices)
    me: str = ""  # this incarnation's address: shards drop its slices when it dies
    # The ids of slice grants (they become stream ids); random in production, a counter in
    # the simulation so that a run replays from its seed. Each is tagged with the shard it
    # is handed to (`secret`: the cluster secret; protocols/stream_ids.py), as that shard's
    # own stream ids are, so that a Pool ends it if the shard dies with it unopened.
    new_lease_id: Callable[[], str] = lambda: auth.unguessable_id("s-")
    secret: bytes = b""
    buckets: list = field(init=False)  # KeyBucket per key
    in_flight: dict = field(default_factory=dict, init=False)  # lease_id -> _Held
    pools: PoolChoice = field(default_factory=PoolChoice, init=False)  # where each Pool is; which runs a call
    queue: deque = field(default_factory=deque, init=False)
    grants_total: int = field(default=0, init=False)
    denials_total: int = field(default=0, init=False)
    fallbacks_total: int = field(default=0, init=False)
    _tick_generation: int = field(default=0, init=False)
    _tick_at: float | None = field(default=None, init=False)
    _last_key: int = field(default=-1, init=False)  # the key of the last grant (round-robin among equals)
    _notes: list = field(default_factory=list, init=False)  # metric records to send (circuit changes, fallbacks)
    holders: dict = field(default_factory=dict, init=False)  # shard address string -> where to send it
    asked_at: dict = field(default_factory=dict, init=False)  # shard address string -> its last LeaseRequest
    recalling: set = field(default_factory=set, init=False)  # shards asked to give their slices back
    asker_hosts: dict = field(default_factory=dict, init=False)  # shard -> the host its last request came from
    sliced_total: int = field(default=0, init=False)
    _recall_due: bool = field(default=False, init=False)  # a circuit changed: recall in `handle`

    def __post_init__(self) -> None:
        self.settings.validated()
        self.buckets = [KeyBucket.new(i, self.settings.burst, self.circuit) for i in range(max(1, self.keys))]

    # Single-key views (the bucket of key #1), as before several keys existed.
    @property
    def tokens(self) -> float:
        return float(sum(b.tokens for b in self.buckets))

    @property
    def paused_until(self) -> float:
        return float(min(b.paused_until for b in self.buckets))

    @property
    def pool(self) -> str | None:
        """The incarnation of Pool 0 ("pool"), as before there were several."""
        return self.pools.incarnation(roles.POOL)

    # --- messages -----------------------------------------------------------------------
    def handle(self, msg: Any, sender: Any, now: float) -> list:
        self._refill(now)
        out = self._dispatch(msg, sender, now)
        if self._recall_due:
            self._recall_due = False
            out = self._recall() + out
        if self._notes:
            out.append(Send(roles.METRICS, m.Records(roles.pacer(self.provider), self._notes)))
            self._notes = []
        return out

    def _dispatch(self, msg: Any, sender: Any, now: float) -> list:
        if isinstance(msg, m.LeaseRequest):
            return self._request(msg, sender, now)
        if isinstance(msg, m.LeaseRelease):
            self._opened(msg.opened or [], now)
            held = self._pop(msg.lease_id, now)
            self._verdicts(held, msg.key_results or [], now)
            out: list = []
            pause = min(msg.retry_after_s or 0.0, LONGEST_PAUSE_S)
            if pause and held is not None:
                bucket = self.buckets[held.key]
                bucket.paused_until = max(bucket.paused_until, now + pause)
                out = self._recall()
            elif pause:
                self._pause(None, now + pause)
                out = self._recall()
            return out + self._drain(now)
        if isinstance(msg, m.AccountPause):  # a 429 the Pool is waiting out before its retry
            out = []
            if msg.pause_s > 0:
                self._pause(msg.key, now + min(msg.pause_s, LONGEST_PAUSE_S))
                out = self._recall()
            return out + self._drain(now)
        if isinstance(msg, m.SliceReport):
            return self._slice_report(msg, sender, now)
        if isinstance(msg, m.SliceOpened):
            self._opened(msg.lease_ids, now)
            return self._drain(now)
        if isinstance(msg, m.LeaseCancel):
            out = []
            held = self._pop(msg.lease_id, now)
            if held is not None:
                if held.probe:
                    self.buckets[held.key].circuit.abandoned()
                # Granted before everyone left: the shard's FailStream stops the call, but it
                # went to the Pool of its time. If that Pool died meanwhile, the grant may have
                # opened the call at its replacement, which never hears of the cancel; this
                # one follows our OpenStream on the same link (a second one is ignored).
                out.append(
                    Send(
                        held.hub, m.FailStream(msg.lease_id, "cancelled", "cancelled before the upstream call started")
                    )
                )
            self.queue = deque(w for w in self.queue if w.lease_id != msg.lease_id)
            return out + self._drain(now)
        if isinstance(msg, Tick):
            if msg.generation == self._tick_generation:
                self._tick_at = None
            return self._drain(now)
        if isinstance(msg, PoolAt):
            self.pools.place(msg.role, msg.incarnation, msg.host)
            return self._drain(now)
        if isinstance(msg, m.MemberLost):
            return self._member_lost(msg, now)
        return []

    def _pause(self, key: int | None, until: float) -> None:
        for bucket in self.buckets:
            if key is None or bucket.index == key:
                bucket.paused_until = max(bucket.paused_until, until)

    # --- circuits -------------------------------------------------------------------------
    def _verdicts(self, held: _Held | None, results: list, now: float) -> None:
        judged = set()
        for item in results:
            try:
                key, ok = int(item[0]), bool(item[1])
            except (TypeError, ValueError, IndexError):
                continue
            if 0 <= key < len(self.buckets):
                judged.add(key)
                self._circuit_changed(self.buckets[key], self.buckets[key].circuit.record(ok, now), now)
        if held is not None and held.probe and held.key not in judged:
            self.buckets[held.key].circuit.abandoned()  # cancelled, or no verdict: probe again

    def _circuit_changed(self, bucket: KeyBucket, state: str | None, now: float) -> None:
        if state is None:
            return
        circuit = bucket.circuit
        # No slice may stay out on a key that keeps failing, and one that recovers takes its
        # share again: every change of a circuit recalls the slices (they are cut anew).
        self._recall_due = True
        if state == OPEN:
            log.warning(
                "circuit open: account=%s key=%s open_for=%gs opens=%d",
                self.provider,
                bucket.name,
                circuit.open_for,
                circuit.opens_total,
            )
        elif state == HALF_OPEN:
            log.warning("circuit half-open: account=%s key=%s (the next call probes)", self.provider, bucket.name)
        else:
            log.warning("circuit closed: account=%s key=%s (the probe succeeded)", self.provider, bucket.name)
        self._notes.append({"kind": "circuit", "account": self.provider, "key": bucket.name, "state": state, "at": now})

    def _all_open(self) -> bool:
        """Every key cooling down: nothing can be granted until one half-opens."""
        return all(b.circuit.state == OPEN for b in self.buckets)

    def _alternatives(self, request: m.LeaseRequest) -> list:
        if request.fallback_from:
            return list(request.fallbacks or [])  # a fallback does not chain into its own fallbacks
        return list(self.fallbacks)

    def _fall_back(self, waiter: _Waiter, alternatives: list, reason: str, now: float) -> list:
        request = waiter.request
        provider, model = alternatives[0][0], alternatives[0][1]
        origin = request.fallback_from or request.provider
        self.fallbacks_total += 1
        log.warning("fallback: from=%s to=%s/%s reason=%s stream=%s", origin, provider, model, reason, request.lease_id)
        self._notes.append({"kind": "fallback", "from": origin, "to": provider, "reason": reason, "at": now})
        return [
            Send(waiter.requester, m.LeaseFallback(request.lease_id, provider, model, alternatives[1:], origin, reason))
        ]

    def _unavailable(self, waiter: _Waiter, listening: str, now: float) -> list:
        """Every key's circuit is open and there is no fallback: fail fast. `listening`: the
        hub its admitted clients listen at, where its stream ends too ("": none admitted
        yet, the shard rejects them); see `_denied_on_arrival` for which hub that is."""
        self.denials_total += 1
        retry = round(max(1.0, min(b.circuit.half_opens_at for b in self.buckets) - now), 3)
        text = f"{self.provider}: the provider keeps failing (every API key's circuit is open); retry in {retry:g} s"
        out = [Send(waiter.requester, m.LeaseDenied(waiter.lease_id, 503, "upstream_unavailable", text, retry))]
        if listening:
            out.append(Send(listening, m.FailStream(waiter.lease_id, "upstream_unavailable", text)))
        return out

    # --- crashes of others -----------------------------------------------------------------
    def _member_lost(self, msg: m.MemberLost, now: float) -> list:
        out: list = []
        if roles.is_pool(msg.role):
            # Its calls died with it: no LeaseRelease will ever come for them.
            for lease_id in [k for k, held in self.in_flight.items() if held.pool == msg.incarnation]:
                held = self.in_flight[lease_id]
                self._pop(lease_id, now)
                if held.probe:
                    self.buckets[held.key].circuit.abandoned()
            if self.pools.incarnation(msg.role) == msg.incarnation:
                self.pools.place(msg.role, None)
            # Those queued for it had their clients listening at its hub, which went with it.
            # The stream ends at the replacement's hub too, for anyone who subscribed there.
            lost = [w for w in self.queue if w.hub == msg.role and w.pool == msg.incarnation]
            self.queue = deque(w for w in self.queue if not (w.hub == msg.role and w.pool == msg.incarnation))
            text = f"{msg.role} restarted before this request's upstream call started; retry it"
            for waiter in lost:
                self.denials_total += 1
                out.append(Send(waiter.requester, m.LeaseDenied(waiter.lease_id, 503, "pool_lost", text, 1.0)))
                out.append(Send(waiter.hub, m.FailStream(waiter.lease_id, "pool_lost", text)))
        elif roles.is_coalescer(msg.role):
            self.asked_at.pop(msg.incarnation, None)
            # Its flights are gone: nobody would admit or cancel them. A queued request is
            # dropped; a granted call is failed (the Pool aborts it; its LeaseRelease then
            # finds the lease already reclaimed). Either way the edges' clients get an error.
            lost = [w for w in self.queue if w.request.coalescer == msg.incarnation]
            self.queue = deque(w for w in self.queue if w.request.coalescer != msg.incarnation)
            failed = [(w.lease_id, w.hub) for w in lost]
            # Its slice goes with its leases: the grants it held come back at once (counted
            # as spent: it may have opened calls with them, which the FailStream ends).
            for lease_id in [k for k, held in self.in_flight.items() if held.asker == msg.incarnation]:
                held = self.in_flight[lease_id]
                self._pop(lease_id, now)
                if held.probe:
                    self.buckets[held.key].circuit.abandoned()
                failed.append((lease_id, held.hub))
            self.holders.pop(msg.incarnation, None)
            self.recalling.discard(msg.incarnation)
            text = f"{msg.role} restarted; this request was lost with it, retry it"
            out += [Send(hub, m.FailStream(lease_id, "coalescer_lost", text)) for lease_id, hub in failed]
        return out + self._drain(now)

    def configure(self, changes: dict, now: float) -> list:
        """Admin: change settings live (every key of the account takes them); raises
        ValueError (state unchanged) when invalid."""
        new = settings_from(self.settings, changes)
        self._refill(now)
        self.settings = new
        for bucket in self.buckets:
            bucket.tokens = min(bucket.tokens, float(new.burst - bucket.held))
        # Slices were cut by the old settings: they come back and are cut anew.
        return self._recall() + self._drain(now)

    def state(self, now: float) -> dict:
        self._refill(now)
        return {
            "provider": self.provider,
            "settings": {k: getattr(self.settings, k) for k in SETTING_TYPES},
            "tokens": round(self.tokens, 3),
            # calls granted and not over; grants that shards hold unused (slices) apart
            "in_flight": sum(1 for h in self.in_flight.values() if h.sliced != "held"),
            "held": sum(1 for h in self.in_flight.values() if h.sliced == "held"),
            "queue_depth": len(self.queue),
            # per Pool: its calls granted (running) and queued, and whether it is up
            "pools": {
                role: {
                    "in_flight": sum(1 for h in self.in_flight.values() if h.hub == role and h.sliced != "held"),
                    "held": sum(1 for h in self.in_flight.values() if h.hub == role and h.sliced == "held"),
                    "queued": sum(1 for w in self.queue if w.hub == role),
                    "up": inc is not None,
                    "host": self.pools.hosts.get(role, ""),
                }
                for role, inc in self.pools.at.items()
            },
            "paused_for_s": round(max(0.0, self.paused_until - now), 3),
            "grants_total": self.grants_total,
            "denials_total": self.denials_total,
            "fallbacks_total": self.fallbacks_total,
            "fallbacks": ["/".join(f) for f in self.fallbacks],
            # lease slices: grants the shards hold unused, per shard, and all handed out
            "slices": {asker: n for asker in self.holders if (n := self._held_by(asker))},
            "sliced_total": self.sliced_total,
            "keys": [
                {
                    "key": b.name,
                    "tokens": round(b.tokens, 3),
                    "in_flight": sum(1 for h in self.in_flight.values() if h.key == b.index and h.sliced != "held"),
                    "held": b.held,
                    "paused_for_s": round(max(0.0, b.paused_until - now), 3),
                    "circuit": b.circuit.state,
                    "circuit_opens": b.circuit.opens_total,
                    "half_opens_in_s": round(max(0.0, b.circuit.half_opens_at - now), 3)
                    if b.circuit.state == OPEN
                    else None,
                }
                for b in self.buckets
            ],
        }

    def circuit_gauges(self, now: float) -> list[dict]:
        return [
            {
                "kind": "gauge",
                "name": "circuit_state",
                "labels": {"account": self.provider, "key": b.name},
                "value": STATE_VALUE[b.circuit.state],
                "at": now,
            }
            for b in self.buckets
        ]

    # --- the buckets ----------------------------------------------------------------------
    def _request(self, msg: m.LeaseRequest, sender: Any, now: float) -> list:
        if msg.lease_id in self.in_flight or any(w.lease_id == msg.lease_id for w in self.queue):
            return []  # asked again (a shard re-asking after a Pacer crash): the first ask's answers stand
        busy = self._busy(msg.coalescer, now)
        # Those already waiting go first: whatever can be granted now is, before a
        # newcomer is queued behind them (or sees a full queue that is not full).
        out = self._drain(now) if self.queue else []
        if msg.hub and not self.pools.known(msg.hub):
            return out + self._pool_gone(msg, sender)
        hub = msg.hub or self._choose_pool(msg.host)
        waiter = _Waiter(msg.lease_id, sender, now, msg, hub, self.pools.incarnation(hub))
        alternatives = self._alternatives(msg)
        if self._all_open():
            if alternatives:
                return out + self._fall_back(waiter, alternatives, "circuits_open", now)
            return out + self._unavailable(waiter, msg.hub, now)
        if alternatives and self.fallback_queue and len(self.queue) >= self.fallback_queue:
            return out + self._fall_back(waiter, alternatives, "queue", now)
        if not self.queue:
            bucket = self._pick(now, hub)
            if bucket is not None:
                out += self._grant(waiter, bucket, now)
                if busy:
                    self.asker_hosts[msg.coalescer] = msg.host
                    out += self._top_up(msg.coalescer, sender, now)
                return out
        if self._doomed(now, now):
            self.denials_total += 1
            text = self._paused_text(now)
            return out + self._denied_on_arrival(msg, sender, 429, "pacer_queue_timeout", text, self._retry_after(now))
        if len(self.queue) >= self.settings.max_queue:
            self.denials_total += 1
            text = f"{self.provider}: {len(self.queue)} requests already wait for an upstream slot"
            return out + self._denied_on_arrival(msg, sender, 429, "pacer_queue_full", text, self._retry_after(now))
        self.queue.append(waiter)
        # FIFO across slice holders: what they hold unused comes back to the queue's head.
        out += self._recall()
        return out + [Send(sender, m.LeaseQueued(msg.lease_id, len(self.queue), hub))] + self._schedule(now)

    def _pool_gone(self, msg: m.LeaseRequest, sender: Any) -> list:
        """A request that names a Pool this Pacer does not know: its clients were admitted
        and listen at that Pool's hub, and only there. Every Pool a shard is told of was in
        some Pacer's directory; one missing from this Pacer's has left with its host (it
        never comes back), or died and is being replaced (its clients got `hub_disconnected`
        when it died). Either way it is denied as the requests queued for a dead Pool are
        (`pool_lost`), its stream ended at the hub it names (by the shard as well: this
        Pacer may have no address for it). Run on a Pool chosen
        here instead, its stream would go where none of its clients listen (they waited
        for the hub's orphan timeout); kept waiting for the named one, it would hold the
        queue's head for a Pool that will not return."""
        self.denials_total += 1
        text = f"{msg.hub} was lost before this request's upstream call started; retry it"
        return self._denied_on_arrival(msg, sender, 503, "pool_lost", text, 1.0)

    def _denied_on_arrival(
        self, msg: m.LeaseRequest, sender: Any, status: int, code: str, text: str, retry: float | None
    ) -> list:
        """A request denied as it arrives. One that names its hub (`LeaseRequest.hub`: asked
        again of a replaced Pacer, or of a fallback's, after it was queued) has its clients
        admitted and listening there: its stream ends there too, as a queued one's does
        (the shard only rejects those still waiting for its answer). Always the hub it
        names, not the Pool this Pacer would give it: the shard's `Admitted` named that one
        and every edge subscribed there. One this Pacer does not know (`_pool_gone`: its
        host left the cluster) has no address: the host drops the FailStream with a warning,
        and no other hub has a client of this stream to tell."""
        out = [Send(sender, m.LeaseDenied(msg.lease_id, status, code, text, retry))]
        if msg.hub:
            out.append(Send(msg.hub, m.FailStream(msg.lease_id, code, text)))
        return out

    def _drain(self, now: float) -> list:
        out = []
        while self.queue and (
            now - self.queue[0].enqueued_at >= self.settings.max_wait_s - EPS
            or self._doomed(self.queue[0].enqueued_at, now)
        ):
            waiter = self.queue.popleft()
            self.denials_total += 1
            text = (
                self._paused_text(now)
                if self._doomed(waiter.enqueued_at, now)
                else f"{self.provider}: no upstream slot within {self.settings.max_wait_s:g} s"
            )
            out.append(
                Send(
                    waiter.requester,
                    m.LeaseDenied(waiter.lease_id, 429, "pacer_queue_timeout", text, self._retry_after(now)),
                )
            )
            # It was queued, so its clients were admitted and listen at the hub: the stream
            # ends here, not through the shard (which may have died meanwhile).
            out.append(Send(waiter.hub, m.FailStream(waiter.lease_id, "pacer_queue_timeout", text)))
        if self.queue and self._all_open():
            # Nothing can be granted until a key half-opens: those waiting go to a fallback
            # now, or fail fast, rather than wait out the cool-down.
            while self.queue:
                waiter = self.queue.popleft()
                alternatives = self._alternatives(waiter.request)
                if alternatives:
                    out += self._fall_back(waiter, alternatives, "circuits_open", now)
                else:
                    out += self._unavailable(waiter, waiter.hub, now)  # queued: LeaseQueued named it
        while self.queue:
            bucket = self._pick(now, self.queue[0].hub)
            if bucket is None:
                break
            out += self._grant(self.queue.popleft(), bucket, now)
        return out + self._schedule(now)

    def _doomed(self, enqueued_at: float, now: float) -> bool:
        """Is the earliest a grant can come after the end of the wait of a request queued at
        `enqueued_at`? Then it would wait out `max_wait_s` for a certain 429."""
        earliest = self._earliest_grant_in(now)
        return earliest > 0 and now + earliest >= enqueued_at + self.settings.max_wait_s - EPS

    def _earliest_grant_in(self, now: float) -> float:
        """A lower bound of the seconds until the next grant: every key's 429 pause, and what
        `_next_grant_in` knows (the per-minute cap, the bucket); 0 when a release may come
        any moment and nothing else stands in the way."""
        grant_in = self._next_grant_in(now)
        return max(grant_in or 0.0, self.paused_until - now)

    def _paused_text(self, now: float) -> str:
        earliest = self._earliest_grant_in(now)
        if self.paused_until - now >= earliest - EPS:
            why = "by the provider's Retry-After"
        elif self.settings.rpm is not None:
            why = f"by the per-minute cap, {self.settings.rpm} a minute"
        else:
            why = "by the rate"
        return (
            f"{self.provider}: no upstream slot for {earliest:.3g} s ({why}), "
            f"longer than a request may wait for one ({self.settings.max_wait_s:g} s)"
        )

    def _loads(self) -> dict[int, int]:
        loads: dict[int, int] = {}
        for held in self.in_flight.values():
            loads[held.key] = loads.get(held.key, 0) + 1
        return loads

    def _choose_pool(self, near: str) -> str:
        """The Pool for a call (or a slice grant) whose first client arrived at `near`."""
        return self.pools.choose(self._pool_loads(), near, busy=self._pool_loads(held=False))

    def _pool_loads(self, held: bool = True) -> dict[str, int]:
        """Calls per Pool (role): granted and still running, and queued for it; with `held`,
        also the slice grants shards hold for it unused (calls to come: they spread the
        grants of a slice over the Pools). Pool locality's "much busier" test counts calls
        only: held grants are budget, and counted there they made a host whose shards had
        just been cut slices send its own requests elsewhere (the simulation found it)."""
        loads: dict[str, int] = {}
        for lease in self.in_flight.values():
            if held or lease.sliced != "held":
                loads[lease.hub] = loads.get(lease.hub, 0) + 1
        for waiter in self.queue:
            loads[waiter.hub] = loads.get(waiter.hub, 0) + 1
        return loads

    def _pick(self, now: float, hub: str) -> KeyBucket | None:
        """A key to grant on now for a call on Pool `hub`; None while that Pool is down."""
        if self.pools.incarnation(hub) is None:
            return None
        return choose(self.buckets, now, self.settings, self._loads(), self._last_key)

    def _grant(self, waiter: _Waiter, bucket: KeyBucket, now: float) -> list:
        probe = bucket.take(now)
        self._last_key = bucket.index
        pool = self.pools.incarnation(waiter.hub)
        self.in_flight[waiter.lease_id] = _Held(now, pool, waiter.request.coalescer, bucket.index, probe, waiter.hub)
        self.grants_total += 1
        wait_ms = (now - waiter.enqueued_at) * 1000.0
        r = waiter.request
        keys = [bucket.index] if probe else retry_order(self.buckets, bucket)
        # The call goes to the Pool from here, not back through the Coalescer: one hop
        # fewer before the upstream call. The Coalescer learns of the grant in parallel.
        return [
            Send(
                waiter.hub,
                m.OpenStream(
                    r.lease_id,
                    r.provider,
                    r.model,
                    r.body,
                    r.lease_id,
                    wait_ms,
                    r.coalescer,
                    bucket.index,
                    keys,
                    r.fallback_from,
                ),
            ),
            Send(waiter.requester, m.LeaseGranted(waiter.lease_id, wait_ms, pool or "", waiter.hub)),
        ]

    # --- lease slices ---------------------------------------------------------------------
    def _pop(self, lease_id: str, now: float) -> _Held | None:
        """A lease ends (released, cancelled, reclaimed): a slice grant still "held" counts
        as used (its token spent, its per-minute place from now)."""
        held: _Held | None = self.in_flight.pop(lease_id, None)
        if held is not None and held.sliced == "held":
            self.buckets[held.key].slice_used(now)
        return held

    def _busy(self, asker: str, now: float) -> bool:
        """Did `asker` ask before, within SLICE_DEMAND_S? Only then is it cut a slice: a shard
        that asks now and then would give it back unused (two messages more than the ask)."""
        last, self.asked_at[asker] = self.asked_at.get(asker), now
        return last is not None and now - last < SLICE_DEMAND_S

    def _held_by(self, asker: str) -> int:
        return sum(1 for h in self.in_flight.values() if h.sliced == "held" and h.asker == asker)

    def _slice_report(self, msg: m.SliceReport, sender: Any, now: float) -> list:
        self.holders[msg.coalescer] = sender
        for lease_id in msg.used:
            self._mark_used(lease_id, now, msg.coalescer)
        for lease_id in msg.returned:
            held = self.in_flight.get(lease_id)
            if held is not None and held.sliced == "held" and held.asker == msg.coalescer:
                del self.in_flight[lease_id]
                self.buckets[held.key].slice_returned(self.settings)
        if not self._held_by(msg.coalescer):
            self.recalling.discard(msg.coalescer)
        out = self._drain(now)
        if msg.refill:
            out += self._top_up(msg.coalescer, sender, now)
        return out

    def _opened(self, lease_ids: list, now: float) -> None:
        """The Pool opened calls with these slice grants (`SliceOpened`, `LeaseRelease.opened`):
        in flight on it from now, whether or not their shard has reported them yet."""
        for lease_id in lease_ids:
            self._mark_used(str(lease_id), now)

    def _mark_used(self, lease_id: str, now: float, asker: str | None = None) -> None:
        """A held grant was used (the Pool or its shard says so, whichever comes first): its
        token is spent and its per-minute place stamped now, no earlier than its call. The
        second word of it finds it "used" and changes nothing."""
        held = self.in_flight.get(lease_id)
        if held is not None and held.sliced == "held" and (asker is None or held.asker == asker):
            self.buckets[held.key].slice_used(now)
            self.in_flight[lease_id] = replace(held, sliced="used")

    def _top_up(self, asker: str, sender: Any, now: float) -> list:
        """Hand `asker` grants up to `slice_size`, from surplus only, while nothing waits."""
        if self.slice_size <= 0 or self.queue or asker in self.recalling or not asker:
            return []
        self.holders[asker] = sender
        grants = []
        for _ in range(self.slice_size - self._held_by(asker)):
            loads = self._loads()
            ready = [b for b in self.buckets if b.can_slice(now, self.settings, loads.get(b.index, 0))]
            if not ready:
                break
            n = len(self.buckets)
            bucket = min(ready, key=lambda b: (loads.get(b.index, 0), (b.index - self._last_key - 1) % n))
            # On a Pool of the host the shard's requests last came from (Pool locality):
            # the shard takes a grant only for a request from that host.
            near = self.asker_hosts.get(asker, "")
            hub = self._choose_pool(near)
            pool = self.pools.incarnation(hub)
            if pool is None:
                break  # no Pool up: nothing to open a call on
            # The grant's holder is its owner: if the shard dies before its OpenStream leaves,
            # the hub ends the stream its clients were admitted to (`owner_lost`), even with
            # this Pacer dead too.
            lease_id = stream_ids.owned(self.new_lease_id(), self.secret, asker)
            bucket.slice_out()
            self._last_key = bucket.index
            self.in_flight[lease_id] = _Held(now, pool, asker, bucket.index, False, hub, "held")
            self.sliced_total += 1
            host = self.pools.hosts.get(hub, "")
            grants.append([lease_id, bucket.index, retry_order(self.buckets, bucket), hub, pool, host])
        return (
            [Send(sender, m.SliceGrant(roles.pacer(self.provider), self.me, grants, self.slice_size))] if grants else []
        )

    def _recall(self) -> list:
        """Ask every shard holding grants unused (as far as we know) to give them back."""
        out = []
        for asker in sorted({h.asker for h in self.in_flight.values() if h.sliced == "held"}):
            if asker not in self.recalling and asker in self.holders:
                self.recalling.add(asker)
                out.append(Send(self.holders[asker], m.SliceRecall(roles.pacer(self.provider))))
        return out

    def _refill(self, now: float) -> None:
        for bucket in self.buckets:
            bucket.refill(now, self.settings)
            self._circuit_changed(bucket, bucket.circuit.refresh(now), now)

    def _next_grant_in(self, now: float) -> float | None:
        """Seconds until some key could allow a grant (bucket, pause, per-minute cap,
        cool-down), or None when only a release (or a Pool coming up) can."""
        if self.queue and self.pools.incarnation(self.queue[0].hub) is None:
            return None
        loads = self._loads()
        waits = [w for b in self.buckets if (w := b.grant_in(now, self.settings, loads.get(b.index, 0))) is not None]
        return min(waits) if waits else None

    def _schedule(self, now: float) -> list:
        if not self.queue:
            return []
        delays = [self.queue[0].enqueued_at + self.settings.max_wait_s - now]
        grant_in = self._next_grant_in(now)
        if grant_in is not None:
            delays.append(grant_in)
        at = now + max(0.0, min(delays))
        if self._tick_at is not None and self._tick_at <= at:
            return []  # an earlier tick is already set and will reschedule
        self._tick_generation += 1
        self._tick_at = at
        return [After(at - now, Tick(self._tick_generation))]

    def _retry_after(self, now: float) -> float:
        """Seconds after which a retry could plausibly be granted: the queue ahead drained
        at the buckets' rate, not earlier than a pause ends."""
        ahead = len(self.queue) + 1 - self.tokens
        estimate = max(0.0, ahead / (self.settings.rps * len(self.buckets)), self.paused_until - now)
        return round(max(1.0, estimate), 3)
