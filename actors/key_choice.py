"""One API key's budget, and the choice of the key a call goes out on.

Providers enforce their rate limits per key (per organisation or project, which is what a
key belongs to), so each key of an account has its own token bucket, per-minute cap,
concurrency, 429 pause and circuit breaker, all with the account's settings
(<ACCOUNT>_RPS/_BURST/_CONCURRENCY/_RPM apply per key). The Pacer (actors/pacer_logic.py)
holds one `KeyBucket` per key and grants a lease on whichever key can grant: of those whose
circuit allows a call and whose bucket has a token, the least loaded (fewest calls in
flight), and among equals the next in turn (round-robin), so that a burst and a trickle
alike spread over the keys.

Lease slices (docs/architecture.md, "Lease slices"): a grant handed to a Coalescer shard
ahead of demand takes its token at once and stays counted as `held` (the refill stops at
BURST minus what shards hold, so the bucket and the held tokens together never exceed
BURST) and as `outstanding` (a place in the per-minute window that never expires) until
the shard reports it used (then it is stamped at that time, which is no earlier than the
call) or gives it back (then nothing was spent). A slice only ever takes surplus
(`can_slice`): never the last token, the last concurrency slot or the last per-minute
place, so a request that reaches the Pacer is paced as without slices.

Keys are named by their position, "#1", "#2", ... in logs, metrics and admin state: never
by their value.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from actors.circuit import CLOSED, OPEN, CircuitBreaker, CircuitSettings

EPS = 1e-9


def key_name(index: int) -> str:
    return f"#{index + 1}"


@dataclass
class KeyBucket:
    index: int  # 0-based position in <ACCOUNT>_API_KEYS
    tokens: float
    circuit: CircuitBreaker
    updated_at: float | None = None
    paused_until: float = 0.0
    recent_grants: deque = field(default_factory=deque)  # grant times, for rpm
    held: int = 0  # tokens taken by slice grants the shards hold unused
    outstanding: int = 0  # slice grants not yet stamped in recent_grants (held, or used unreported)

    @classmethod
    def new(cls, index: int, burst: int, circuit: CircuitSettings) -> KeyBucket:
        return cls(index, float(burst), CircuitBreaker(circuit))

    @property
    def name(self) -> str:
        return key_name(self.index)

    def refill(self, now: float, settings) -> None:
        if self.updated_at is not None and now > self.updated_at:
            cap = float(settings.burst - self.held)
            self.tokens = min(cap, self.tokens + (now - self.updated_at) * settings.rps)
        self.updated_at = now if self.updated_at is None else max(self.updated_at, now)
        while self.recent_grants and self.recent_grants[0] <= now - 60.0 + EPS:
            self.recent_grants.popleft()

    def can_grant(self, now: float, settings, load: int) -> bool:
        return (
            self.circuit.allows()
            and now >= self.paused_until - EPS
            and load < settings.concurrency
            and self.tokens >= 1.0 - EPS
            and (settings.rpm is None or len(self.recent_grants) + self.outstanding < settings.rpm)
        )

    def can_slice(self, now: float, settings, load: int) -> bool:
        """May a grant on this key go into a slice: surplus only, on a closed circuit."""
        return (
            self.circuit.state == CLOSED
            and now >= self.paused_until - EPS
            and load + 1 < settings.concurrency
            and self.tokens >= 2.0 - EPS
            and (settings.rpm is None or len(self.recent_grants) + self.outstanding + 1 < settings.rpm)
        )

    def slice_out(self) -> None:
        """A grant goes into a slice: its token is held, its per-minute place open-ended."""
        self.tokens -= 1.0
        self.held += 1
        self.outstanding += 1

    def slice_used(self, now: float) -> None:
        """A held grant was used (reported, or its call ended): the token is spent, its
        per-minute place counts from now (no earlier than the call)."""
        self.held -= 1
        self.outstanding -= 1
        bisect.insort(self.recent_grants, now)

    def slice_returned(self, settings) -> None:
        """A held grant came back unused: its token returns, nothing was spent."""
        self.held -= 1
        self.outstanding -= 1
        self.tokens = min(float(settings.burst - self.held), self.tokens + 1.0)

    def take(self, now: float) -> bool:
        """Spend a token for a grant; True when the grant is the circuit's half-open probe."""
        self.tokens -= 1.0
        self.recent_grants.append(now)
        return self.circuit.granted()

    def grant_in(self, now: float, settings, load: int) -> float | None:
        """Seconds until this key could grant (bucket, pause, per-minute cap, cool-down),
        or None when only a release can make it (concurrency, a probe out)."""
        if load >= settings.concurrency:
            return None
        waits = [self.paused_until - now]
        if self.circuit.state == OPEN:
            waits.append(self.circuit.half_opens_at - now)
        elif not self.circuit.allows():
            return None  # half-open, its probe is out
        if self.tokens < 1.0:
            if settings.burst - self.held < 1:
                return None  # the shards hold the bucket: only a report or a return frees it
            waits.append((1.0 - self.tokens) / settings.rps)
        if settings.rpm is not None and len(self.recent_grants) + self.outstanding >= settings.rpm:
            expiring = len(self.recent_grants) + self.outstanding - settings.rpm
            if expiring >= len(self.recent_grants):
                return None  # held slice grants fill the window: only a report frees a place
            waits.append(self.recent_grants[expiring] + 60.0 - now)
        return max(0.0, *waits)


def choose(buckets: list[KeyBucket], now: float, settings, loads: dict[int, int], last: int = -1) -> KeyBucket | None:
    """The key the next grant goes out on, or None when none can grant now: the least
    loaded; among equals, the next one after `last` (the key of the previous grant)."""
    ready = [b for b in buckets if b.can_grant(now, settings, loads.get(b.index, 0))]
    if not ready:
        return None
    n = len(buckets)
    return min(ready, key=lambda b: (loads.get(b.index, 0), (b.index - last - 1) % n))


def retry_order(buckets: list[KeyBucket], granted: KeyBucket) -> list[int]:
    """The keys a call tries, attempt after attempt: the granted one, then the others whose
    circuit is closed (a retry on another key escapes a failure of one key)."""
    others = [b.index for b in buckets if b is not granted and b.circuit.state == CLOSED]
    return [granted.index, *others]
