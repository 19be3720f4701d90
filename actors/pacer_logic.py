"""The Pacer's logic: a token bucket, an in-flight cap, a per-minute cap and a FIFO queue.

One Pacer per upstream provider. Only upstream calls ask for a lease (coalesced followers
never reach the Pacer). A lease is granted when all of these hold:

    now >= paused_until                 (an upstream 429 Retry-After pauses grants)
    len(in_flight) < concurrency        (CONCURRENCY)
    tokens >= 1                         (bucket refills at RPS per second up to BURST)
    grants in the last 60 s < rpm       (RPM, optional; Perplexity tier 0 is 50/min)

and nobody is ahead in the queue (FIFO). A grant sends the call the request carries to
the Pool (`OpenStream`) and `LeaseGranted` to the Coalescer. A request that cannot be
granted waits in the queue; when the queue holds `max_queue` leases, or a lease waited
`max_wait_s`, it is denied with 429 and a Retry-After estimated from the bucket. Settings
change live (`configure`), and the change applies to the queue already waiting.

Every lease belongs to the process incarnations it involves: the Pool incarnation its
call was sent to (`pool`, learnt from the directory: `PoolAt`) and the Coalescer shard
that asked. `MemberLost` for one of them reclaims what it held at once (docs/reliability.md):
a dead Pool's leases come back, a dead shard's queued requests are dropped and its
granted calls are failed. No grant is made while no Pool is known: the queue waits.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from actors.effects import After, Send
from protocols import messages as m

# Float slack for boundaries: a timer set for exactly "the wait is over" computes its delay
# as boundary - now, and now + delay can land an ulp short of the boundary. Without slack
# the tick finds nothing to do, re-arms for ~0 s and spins until the clock moves on (in
# a simulation with a virtual clock: forever).
EPS = 1e-9


@dataclass(frozen=True)
class PacerSettings:
    rps: float = 1.0
    burst: int = 2
    concurrency: int = 3
    rpm: int | None = None
    max_queue: int = 1000
    max_wait_s: float = 30.0

    def validated(self) -> PacerSettings:
        problems = []
        if not (self.rps > 0 and math.isfinite(self.rps)):
            problems.append("rps must be a positive number")
        if self.burst < 1:
            problems.append("burst must be >= 1")
        if self.concurrency < 1:
            problems.append("concurrency must be >= 1")
        if self.rpm is not None and self.rpm < 1:
            problems.append("rpm must be >= 1 or unset")
        if self.max_queue < 0:
            problems.append("max_queue must be >= 0")
        if not (self.max_wait_s > 0):
            problems.append("max_wait_s must be > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


SETTING_TYPES = {
    "rps": float,
    "burst": int,
    "concurrency": int,
    "rpm": int,
    "max_queue": int,
    "max_wait_s": float,
}


def settings_from(base: PacerSettings, changes: dict) -> PacerSettings:
    """Apply admin `changes` to `base`; ValueError names the bad key or value."""
    values: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in SETTING_TYPES:
            raise ValueError(f"unknown pacer setting {key!r} (known: {sorted(SETTING_TYPES)})")
        if key == "rpm" and value in (None, 0, "", "0"):
            values[key] = None
            continue
        try:
            kind = SETTING_TYPES[key]
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            values[key] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"pacer setting {key!r}: {value!r} is not a valid {SETTING_TYPES[key].__name__}") from None
    return replace(base, **values).validated()


@dataclass(frozen=True, slots=True)
class Tick:
    """Timer: re-check the queue (a token arrived, a pause ended, a wait expired)."""

    generation: int


@dataclass(frozen=True, slots=True)
class PoolAt:
    """Local (never on the wire): the directory says the Pool is now at `incarnation`
    (None: no Pool is up; grants wait)."""

    incarnation: str | None


@dataclass(frozen=True, slots=True)
class _Held:
    """A granted lease and who holds it."""

    granted_at: float
    pool: str | None  # the Pool incarnation its OpenStream went to
    asker: str  # the Coalescer shard (address) that asked


@dataclass
class _Waiter:
    lease_id: str
    requester: object
    enqueued_at: float
    request: m.LeaseRequest


@dataclass
class PacerLogic:
    provider: str
    settings: PacerSettings = field(default_factory=PacerSettings)
    tokens: float = field(init=False)
    updated_at: float | None = field(default=None, init=False)
    paused_until: float = field(default=0.0, init=False)
    in_flight: dict = field(default_factory=dict, init=False)  # lease_id -> _Held
    pool: str | None = field(default="pool", init=False)  # the Pool incarnation grants go to
    queue: deque = field(default_factory=deque, init=False)
    recent_grants: deque = field(default_factory=deque, init=False)  # grant times, for rpm
    grants_total: int = field(default=0, init=False)
    denials_total: int = field(default=0, init=False)
    _tick_generation: int = field(default=0, init=False)
    _tick_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.settings.validated()
        self.tokens = float(self.settings.burst)

    # --- messages -----------------------------------------------------------------------
    def handle(self, msg: Any, sender: Any, now: float) -> list:
        self._refill(now)
        if isinstance(msg, m.LeaseRequest):
            return self._request(msg, sender, now)
        if isinstance(msg, m.LeaseRelease):
            self.in_flight.pop(msg.lease_id, None)
            if msg.retry_after_s:
                self.paused_until = max(self.paused_until, now + msg.retry_after_s)
            return self._drain(now)
        if isinstance(msg, m.AccountPause):  # a 429 the Pool is waiting out before its retry
            if msg.pause_s > 0:
                self.paused_until = max(self.paused_until, now + msg.pause_s)
            return self._drain(now)
        if isinstance(msg, m.LeaseCancel):
            out: list = []
            if self.in_flight.pop(msg.lease_id, None) is not None:
                # Granted before everyone left: the shard's FailStream stops the call, but it
                # went to the Pool of its time. If that Pool died meanwhile, the grant may have
                # opened the call at its replacement, which never hears of the cancel; this
                # one follows our OpenStream on the same link (a second one is ignored).
                out.append(Send("pool", m.FailStream(msg.lease_id, "cancelled", "cancelled before the upstream call started")))
            self.queue = deque(w for w in self.queue if w.lease_id != msg.lease_id)
            return out + self._drain(now)
        if isinstance(msg, Tick):
            if msg.generation == self._tick_generation:
                self._tick_at = None
            return self._drain(now)
        if isinstance(msg, PoolAt):
            self.pool = msg.incarnation
            return self._drain(now)
        if isinstance(msg, m.MemberLost):
            return self._member_lost(msg, now)
        return []

    # --- crashes of others -----------------------------------------------------------------
    def _member_lost(self, msg: m.MemberLost, now: float) -> list:
        out: list = []
        if msg.role == "pool":
            # Its calls died with it: no LeaseRelease will ever come for them.
            for lease_id in [k for k, held in self.in_flight.items() if held.pool == msg.incarnation]:
                del self.in_flight[lease_id]
            if self.pool == msg.incarnation:
                self.pool = None
        elif msg.role.startswith("coalescer:"):
            # Its flights are gone: nobody would admit or cancel them. A queued request is
            # dropped; a granted call is failed (the Pool aborts it; its LeaseRelease then
            # finds the lease already reclaimed). Either way the edges' clients get an error.
            lost = [w for w in self.queue if w.request.coalescer == msg.incarnation]
            self.queue = deque(w for w in self.queue if w.request.coalescer != msg.incarnation)
            failed = [w.lease_id for w in lost]
            for lease_id in [k for k, held in self.in_flight.items() if held.asker == msg.incarnation]:
                del self.in_flight[lease_id]
                failed.append(lease_id)
            text = f"{msg.role} restarted; this request was lost with it, retry it"
            out += [Send("pool", m.FailStream(lease_id, "coalescer_lost", text)) for lease_id in failed]
        return out + self._drain(now)

    def configure(self, changes: dict, now: float) -> list:
        """Admin: change settings live; raises ValueError (state unchanged) when invalid."""
        new = settings_from(self.settings, changes)
        self._refill(now)
        self.settings = new
        self.tokens = min(self.tokens, float(new.burst))
        return self._drain(now)

    def state(self, now: float) -> dict:
        self._refill(now)
        return {
            "provider": self.provider,
            "settings": {k: getattr(self.settings, k) for k in SETTING_TYPES},
            "tokens": round(self.tokens, 3),
            "in_flight": len(self.in_flight),
            "queue_depth": len(self.queue),
            "paused_for_s": round(max(0.0, self.paused_until - now), 3),
            "grants_total": self.grants_total,
            "denials_total": self.denials_total,
        }

    # --- the bucket -----------------------------------------------------------------------
    def _request(self, msg: m.LeaseRequest, sender: Any, now: float) -> list:
        if msg.lease_id in self.in_flight or any(w.lease_id == msg.lease_id for w in self.queue):
            return []  # asked again (a shard re-asking after a Pacer crash): the first ask's answers stand
        # Those already waiting go first: whatever can be granted now is, before a
        # newcomer is queued behind them (or sees a full queue that is not full).
        out = self._drain(now) if self.queue else []
        if not self.queue and self._can_grant(now):
            return out + self._grant(_Waiter(msg.lease_id, sender, now, msg), now)
        if len(self.queue) >= self.settings.max_queue:
            self.denials_total += 1
            retry = self._retry_after(now)
            return out + [
                Send(
                    sender,
                    m.LeaseDenied(
                        msg.lease_id,
                        429,
                        "pacer_queue_full",
                        f"{self.provider}: {len(self.queue)} requests already wait for an upstream slot",
                        retry,
                    ),
                )
            ]
        self.queue.append(_Waiter(msg.lease_id, sender, now, msg))
        return out + [Send(sender, m.LeaseQueued(msg.lease_id, len(self.queue)))] + self._schedule(now)

    def _drain(self, now: float) -> list:
        out = []
        while self.queue and now - self.queue[0].enqueued_at >= self.settings.max_wait_s - EPS:
            waiter = self.queue.popleft()
            self.denials_total += 1
            text = f"{self.provider}: no upstream slot within {self.settings.max_wait_s:g} s"
            out.append(Send(waiter.requester, m.LeaseDenied(waiter.lease_id, 429, "pacer_queue_timeout", text, self._retry_after(now))))
            # It was queued, so its clients were admitted and listen at the hub: the stream
            # ends here, not through the shard (which may have died meanwhile).
            out.append(Send("pool", m.FailStream(waiter.lease_id, "pacer_queue_timeout", text)))
        while self.queue and self._can_grant(now):
            out += self._grant(self.queue.popleft(), now)
        return out + self._schedule(now)

    def _grant(self, waiter: _Waiter, now: float) -> list:
        self.tokens -= 1.0
        self.in_flight[waiter.lease_id] = _Held(now, self.pool, waiter.request.coalescer)
        self.recent_grants.append(now)
        self.grants_total += 1
        wait_ms = (now - waiter.enqueued_at) * 1000.0
        r = waiter.request
        # The call goes to the Pool from here, not back through the Coalescer: one hop
        # fewer before the upstream call. The Coalescer learns of the grant in parallel.
        return [
            Send("pool", m.OpenStream(r.lease_id, r.provider, r.model, r.body, r.lease_id, wait_ms, r.coalescer)),
            Send(waiter.requester, m.LeaseGranted(waiter.lease_id, wait_ms, self.pool or "")),
        ]

    def _can_grant(self, now: float) -> bool:
        s = self.settings
        return (
            self.pool is not None
            and now >= self.paused_until - EPS
            and len(self.in_flight) < s.concurrency
            and self.tokens >= 1.0 - EPS
            and (s.rpm is None or len(self.recent_grants) < s.rpm)
        )

    def _refill(self, now: float) -> None:
        if self.updated_at is not None and now > self.updated_at:
            self.tokens = min(float(self.settings.burst), self.tokens + (now - self.updated_at) * self.settings.rps)
        self.updated_at = now if self.updated_at is None else max(self.updated_at, now)
        while self.recent_grants and self.recent_grants[0] <= now - 60.0 + EPS:
            self.recent_grants.popleft()

    def _next_grant_in(self, now: float) -> float | None:
        """Seconds until the bucket, pause or per-minute cap could allow a grant, or None
        when only a release (concurrency) can."""
        s = self.settings
        if len(self.in_flight) >= s.concurrency or self.pool is None:
            return None
        waits = [self.paused_until - now]
        if self.tokens < 1.0:
            waits.append((1.0 - self.tokens) / s.rps)
        if s.rpm is not None and len(self.recent_grants) >= s.rpm:
            waits.append(self.recent_grants[0] + 60.0 - now)
        return max(0.0, *waits)

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
        at the bucket's rate, not earlier than a pause ends."""
        ahead = len(self.queue) + 1 - self.tokens
        estimate = max(0.0, ahead / self.settings.rps, self.paused_until - now)
        return round(max(1.0, estimate), 3)
