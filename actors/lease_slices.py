"""A Coalescer shard's lease slices: the grants its Pacers handed it ahead of demand.

Plain logic, no I/O (CoalescerLogic owns one `HeldSlices`). With SLUICE_LEASE_SLICE > 0
a Pacer hands a shard that got a lease up to that many more grants (`SliceGrant`; see
actors/pacer_logic.py and docs/architecture.md, "Lease slices"). A new flight takes one
(`take`) and the shard opens the call itself: OpenStream to the grant's Pool and
Admitted to the edges, with no LeaseRequest / LeaseGranted round trip through the Pacer.

What the shard owes the Pacer, in batches (`SliceReport`):

- the grants it used, once its slice is down to half (with `refill`: it wants more), so
  the Pacer stops counting their tokens as held (the Pool that ran their calls has
  usually told it first: `SliceOpened` / `LeaseRelease.opened`; the second word is a no-op);
- everything it holds, at once, on a `SliceRecall` (a request had to queue at the Pacer,
  a circuit opened, a 429 pause, a settings change), and when none was used for
  `IDLE_S` (an idle shard keeps no budget from the others);
- nothing for the grants of a Pacer or on a Pool that died (`MemberLost`): they are
  dropped here, and the Pacer reclaims them itself.

A shard never takes a grant for a request while one of its own requests to the same
Pacer waits for a lease (FIFO: the later request goes the usual way, behind it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocols import messages as m
from protocols.effects import After, Send

IDLE_S = 2.0  # unused grants go back after this long without a use
EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Grant:
    lease_id: str  # also the stream id of the call it opens (tagged with this shard: stream_ids.py)
    key: int
    keys: list
    hub: str  # the Pool (role) the call goes to
    pool: str  # that Pool's incarnation when the Pacer granted it
    pacer: str  # the incarnation of the Pacer that granted it
    host: str = ""  # the cluster host of its Pool ("": one host)

    def serves(self, host: str) -> bool:
        """May it open the call of a request that arrived at `host`? Only on that host's Pool
        (Pool locality, docs/scale-out.md); on one host, always."""
        return not host or not self.host or self.host == host


@dataclass(frozen=True, slots=True)
class SliceIdle:
    """Timer: give back the slice of `pacer` (a role) if it was not used meanwhile."""

    pacer: str


@dataclass
class _Slice:
    grants: deque = field(default_factory=deque)  # Grant, oldest first
    used: list = field(default_factory=list)  # (lease_id, pacer incarnation) not reported yet
    size: int = 0  # what the Pacer aims for
    last_use: float = 0.0
    timer: bool = False


@dataclass
class HeldSlices:
    """`me`: the shard's address (named in every report)."""

    me: str = ""
    by_pacer: dict = field(default_factory=dict)  # Pacer role -> _Slice
    closed: bool = False  # the shard moved away: it takes no grant any more
    used_total: int = 0

    def held(self, pacer: str) -> int:
        entry = self.by_pacer.get(pacer)
        return len(entry.grants) if entry else 0

    def receive(self, pacer: str, msg: m.SliceGrant, now: float) -> list:
        grants = [
            Grant(str(g[0]), int(g[1]), list(g[2]), str(g[3]), str(g[4]), msg.pacer, str(g[5])) for g in msg.grants
        ]
        if self.closed:
            return [Send(pacer, m.SliceReport(self.me, [], [g.lease_id for g in grants]))]
        entry = self.by_pacer.setdefault(pacer, _Slice())
        entry.grants.extend(grants)
        entry.size = msg.size
        if entry.timer or not entry.grants:
            return []
        entry.timer = True
        entry.last_use = max(entry.last_use, now)
        return [After(IDLE_S, SliceIdle(pacer))]

    def take(self, pacer: str, now: float, host: str = "") -> tuple[Grant | None, list]:
        """A grant for a new flight that arrived at `host` (None: ask the Pacer), and the
        report it may owe."""
        entry = self.by_pacer.get(pacer)
        if entry is None or self.closed:
            return None, []
        grant = next((g for g in entry.grants if g.serves(host)), None)
        if grant is None:
            return None, []
        entry.grants.remove(grant)
        entry.used.append((grant.lease_id, grant.pacer))
        entry.last_use = now
        self.used_total += 1
        if len(entry.grants) > entry.size // 2:
            return grant, []
        return grant, [Send(pacer, self._report(entry, returned=[], refill=True))]

    def recall(self, pacer: str) -> list:
        """The Pacer wants everything back (`SliceRecall`), or the shard moves away."""
        entry = self.by_pacer.get(pacer)
        if entry is None or not (entry.grants or entry.used):
            # Nothing here: still answer, so the Pacer stops waiting for this shard.
            return [Send(pacer, m.SliceReport(self.me, [], []))]
        returned = [g.lease_id for g in entry.grants]
        entry.grants.clear()
        return [Send(pacer, self._report(entry, returned, refill=False))]

    def close(self) -> list:
        """The shard moved to another host: every slice goes back, none is taken again."""
        self.closed = True
        return [effect for pacer in list(self.by_pacer) for effect in self.recall(pacer)]

    def idle(self, msg: SliceIdle, now: float) -> list:
        entry = self.by_pacer.get(msg.pacer)
        if entry is None:
            return []
        entry.timer = False
        if not entry.grants:
            return []
        if now - entry.last_use < IDLE_S - EPS:
            entry.timer = True
            return [After(entry.last_use + IDLE_S - now, SliceIdle(msg.pacer))]
        return self.recall(msg.pacer)

    def pacer_lost(self, pacer_incarnation: str) -> None:
        """A Pacer died: its grants mean nothing to its replacement."""
        for entry in self.by_pacer.values():
            entry.grants = deque(g for g in entry.grants if g.pacer != pacer_incarnation)
            entry.used = [u for u in entry.used if u[1] != pacer_incarnation]

    def pool_lost(self, pool_incarnation: str) -> None:
        """A Pool died: a grant on it would open a call at its replacement, which the
        Pacer no longer counts (it reclaimed the grant)."""
        for entry in self.by_pacer.values():
            entry.grants = deque(g for g in entry.grants if g.pool != pool_incarnation)

    def _report(self, entry: _Slice, returned: list, refill: bool) -> m.SliceReport:
        used, entry.used = [u[0] for u in entry.used], []
        return m.SliceReport(self.me, used, returned, refill)

    def state(self) -> dict:
        return {pacer: len(entry.grants) for pacer, entry in self.by_pacer.items() if entry.grants}
