"""The Pool's control logic: which upstream calls run, and what every ending owes.

Plain logic, no I/O and no clock (the caller passes `now`): `actors/pool.py`'s
`PoolRuntime` hosts it on the Pool's asyncio loop (a task per upstream call, the httpcore
pools, the retries inside a call, the stream hub's sockets), and the simulation
(`sim/harness.py` `SimPool`) runs the same class with a scripted upstream, so a fault
here breaks chaos seeds too.

Inputs: the Pool's control messages (`OpenStream`, `AbortStream`, `FailStream`) and its
own timers (`FlushRecords`, `FlushOpened`), through `handle(msg, now)`; from the host,
`ended(stream_id, end, now)` once an upstream call is over, however it ended (its task
returned, raised, was cancelled, even before it ran), and `retrying(...)` when a call is
about to try again.

Effects: `Send(role or address, msg)` (Thespian), `After(delay_s, FlushRecords())` (a
timer back into `handle`; `FlushOpened` likewise), and for the host's own side of the
Pool: `Start(open)` (run the upstream call), `Stop(stream_id)` (abort it: the host
cancels the call and reports its end through `ended` as for any other), `MarkOpen(stream_id)`
and `Publish(stream_id, events)` (the stream hub, carried out by the host with the hub's
own clock). The hub's state is read through `HubView` (`actors/hub_logic.py` `HubLogic`).

Invariants (tests/test_pool_logic.py): a stream has at most one call; every ending (done,
error, abort, a crash inside the call) sends the Pacer its `LeaseRelease` and the
Coalescer its `StreamFinished` (with an error, the one the hub's subscribers got),
exactly once, and leaves the hub with a terminal event; a grant for a stream that is over
already goes straight back; an abort of a stream with no call changes nothing, and one
that reaches a call as it ends on its own cancels nothing (the outcome is what the call
did). Measurements go to Metrics in batches (`Records`: at most RECORD_FLUSH_S late, at
once when RECORD_BATCH are pending), with the active-streams gauge only when it changed.
A call a shard opened from its lease slice (`OpenStream.pool` set) is told to its Pacer
at most OPENED_FLUSH_S later: in the next `LeaseRelease.opened` to that Pacer, or in a
`SliceOpened` (docs/architecture.md, "Lease slices": the Pacer's count of calls per Pool).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from protocols import events as ev
from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send

RECORD_FLUSH_S = 0.1
RECORD_BATCH = 64
# A call opened from a lease slice is news to its Pacer, which counts the grant as held
# (unused) until told: the notice rides on the next LeaseRelease to that Pacer, or goes
# alone (`SliceOpened`, with whatever else opened meanwhile) this long after the call opened.
# Counted in the simulator (docs/architecture.md, "Lease slices"): from ~25 requests/s on a
# release nearly always goes first (+0.00 messages a request); at 5/s, +0.04; 0.1 s cost
# +0.04 even at 25/s and +0.5 at 5/s. The Pacer's gauges are sampled every second anyway.
OPENED_FLUSH_S = 0.25

CANCELLED = "cancelled: no subscriber left"


class HubView(Protocol):
    """What the logic reads of the stream hub (`HubLogic` has it)."""

    def is_finished(self, stream_id: str) -> bool: ...

    def last_event(self, stream_id: str) -> dict | None: ...


# --- effects for the host's side of the Pool (besides Send and After) ----------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Run the upstream call `open` asks for; report its end with `ended`."""

    open: m.OpenStream


@dataclass(frozen=True, slots=True)
class Stop:
    """Abort the upstream call of `stream_id` (its end is reported with `ended` as usual)."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class MarkOpen:
    """Tell the hub the upstream call started (or failed): no orphan timeout for it."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Append `events` to the stream at the hub (its subscribers get them)."""

    stream_id: str
    events: list[dict]


@dataclass(frozen=True, slots=True)
class FlushRecords:
    """The record batch's timer (a local message, never on the wire)."""


@dataclass(frozen=True, slots=True)
class FlushOpened:
    """The timer of the slice-opened notices no release carried (local, never on the wire)."""


Effect = Send | After | Start | Stop | MarkOpen | Publish


# --- inputs from the host -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallEnd:
    """How an upstream call ended, as the host saw it (actors/upstream.py `CallResult`
    after the retries; the simulation's scripted call)."""

    outcome: str  # "done" | "error" | "cancelled"
    error: dict | None = None
    retry_after_s: float | None = None  # the provider's Retry-After (429, 5xx)
    sent_at: float | None = None  # when its first attempt went out
    first_byte_at: float | None = None
    ended_at: float | None = None
    attempts: int = 1
    key_results: list[list[Any]] | None = None  # [[key, ok]] for the Pacer's circuits
    usage: dict | None = None  # the provider's usage report (token counters)


@dataclass
class PoolCall:
    """One upstream call the Pool runs."""

    open: m.OpenStream
    opened_at: float
    abort_requested_at: float | None = None  # AbortStream.requested_at (the edge's clock)


class PoolLogic:
    """`role` is this Pool's ("pool", "pool:1", ...: named in StreamFinished, its records
    and its gauge); `accounts` the account of each provider (its Pacer holds the leases of
    its calls; a provider not named bills to its own name in capitals); `hub` its stream
    hub's state, read only."""

    def __init__(self, role: str, hub: HubView, accounts: Mapping[str, str] | None = None):
        self.role = role
        self.hub = hub
        self.accounts: Mapping[str, str] = accounts or {}
        self.calls: dict[str, PoolCall] = {}
        self.records: list[dict] = []
        self.reported_active: int | None = None  # the active-streams gauge as last sent
        # This incarnation's address (the host sets it): a lease slice's OpenStream cut on
        # another incarnation of this Pool is refused (None: accept every one).
        self.incarnation: str | None = None
        self._flush_set = False
        # Calls opened from slice grants that their Pacer has not heard of: stream id ->
        # (that Pacer's role, when it opened). Told in the next LeaseRelease to that Pacer,
        # or by `FlushOpened` once the oldest has waited OPENED_FLUSH_S.
        self.unreported: dict[str, tuple[str, float]] = {}
        self._opened_set = False

    def pacer_of(self, provider: str) -> str:
        """The Pacer that holds the leases of `provider`'s calls (its account's)."""
        return roles.pacer(self.accounts.get(provider, provider.upper()))

    # --- control messages -----------------------------------------------------------------
    def handle(self, msg: object, now: float) -> list[Effect]:
        if isinstance(msg, m.OpenStream):
            out = self._open(msg, now)
        elif isinstance(msg, m.AbortStream):
            out = self._abort(msg.stream_id, msg.requested_at)
        elif isinstance(msg, m.FailStream):
            out = self._fail(msg, now)
        elif isinstance(msg, FlushRecords):
            self._flush_set = False
            out = self.flush(now)
        elif isinstance(msg, FlushOpened):
            self._opened_set = False
            out = self._send_opened(now)
        else:
            raise TypeError(f"{self.role}: unexpected {type(msg).__name__}")
        return out + self._flush_timer()

    def _open(self, msg: m.OpenStream, now: float) -> list[Effect]:
        if msg.stream_id in self.calls:
            return []  # a duplicate OpenStream (a replaced Pacer granted it again): its end releases
        if self.hub.is_finished(msg.stream_id):
            # Over already (a replaced Pacer or shard asked again for it): the new grant goes
            # back, and the shard that asked learns how the stream ended.
            last = self.hub.last_event(msg.stream_id) or {}
            outcome, error = ("done", None) if last.get("type") == ev.DONE else ("error", last)
            return [
                Send(self.pacer_of(msg.provider), m.LeaseRelease(msg.stream_id, None)),
                Send(msg.coalescer, m.StreamFinished(msg.stream_id, outcome, error, self.role)),
            ]
        if msg.pool and self.incarnation is not None and msg.pool != self.incarnation:
            # A shard's grant on this Pool's dead predecessor: its Pacer reclaimed the lease
            # when that one died, so the call must not run here uncounted.
            error = ev.error(
                "pool_lost", f"{self.role} restarted before this request's upstream call started; retry it"
            )
            return [
                MarkOpen(msg.stream_id),
                Publish(msg.stream_id, [error]),
                Send(self.pacer_of(msg.provider), m.LeaseRelease(msg.stream_id, None)),
                Send(msg.coalescer, m.StreamFinished(msg.stream_id, "error", error, self.role)),
            ]
        self.calls[msg.stream_id] = PoolCall(msg, now)
        out: list[Effect] = [MarkOpen(msg.stream_id), Start(msg)]
        if msg.pool:  # a shard opened it from its slice: the Pacer counts the grant as unused
            self.unreported[msg.stream_id] = (self.pacer_of(msg.provider), now)
            out += self._opened_timer(now)
        return out

    def _abort(self, stream_id: str, requested_at: float) -> list[Effect]:
        call = self.calls.get(stream_id)
        if call is None or call.abort_requested_at is not None:
            return []  # over meanwhile (its StreamFinished is on its way), or being stopped
        call.abort_requested_at = requested_at
        return [Stop(stream_id)]

    def _fail(self, msg: m.FailStream, now: float) -> list[Effect]:
        if msg.stream_id in self.calls:  # the Pacer's grant opened it before everyone left
            # or the shard that asked for it died (`coalescer_lost`): whoever still listens
            # hears why it ends, not "no subscriber left".
            why = [] if msg.code == "cancelled" else [Publish(msg.stream_id, [ev.error(msg.code, msg.message)])]
            return why + self._abort(msg.stream_id, now)
        return [MarkOpen(msg.stream_id), Publish(msg.stream_id, [ev.error(msg.code, msg.message)])]

    # --- from the host ----------------------------------------------------------------------
    def ended(self, stream_id: str, end: CallEnd | None, now: float) -> list[Effect]:
        """The upstream call of `stream_id` is over; `end` is None when the host has no
        result for it (it raised, or was cancelled before it produced one)."""
        call = self.calls.pop(stream_id, None)
        if call is None:
            return []  # reported twice, or never started here: it owes nothing more
        msg = call.open
        # What the call says it did wins: an abort that reached it as it ended on its own
        # cancelled nothing (the hub has its real terminal event). No result: the abort
        # got it, or it crashed.
        requested = call.abort_requested_at
        outcome = end.outcome if end else "cancelled" if requested is not None else "error"
        error = None if outcome == "cancelled" or end is None else end.error
        out: list[Effect] = []
        if not self.hub.is_finished(stream_id):  # every stream ends at the hub, whatever happened
            out.append(Publish(stream_id, [self._terminal(outcome, error)]))
        if outcome == "error" and error is None:  # no result: the Coalescer gets what the hub got
            error = self.hub.last_event(stream_id) if self.hub.is_finished(stream_id) else self._terminal(outcome, None)
        key_results = (end.key_results or None) if end else None
        pacer = self.pacer_of(msg.provider)
        self.unreported.pop(stream_id, None)  # its own release says more than "opened"
        opened = self._take_opened(pacer) or None
        out.append(Send(pacer, m.LeaseRelease(stream_id, end.retry_after_s if end else None, key_results, opened)))
        out.append(Send(msg.coalescer, m.StreamFinished(stream_id, outcome, error, self.role)))
        usage = (end.usage or {}) if end else {}
        sent_at = (end.sent_at or call.opened_at) if end else now
        ended_at = (end.ended_at or now) if end else now
        first_byte_at = end.first_byte_at if end else None
        out += self._record(
            {
                "kind": "upstream",
                "stream_id": stream_id,
                "provider": msg.provider,
                "outcome": outcome,
                "error_code": (error or {}).get("code"),
                "upstream_ttft_ms": None if first_byte_at is None else (first_byte_at - sent_at) * 1000.0,
                "latency_ms": (ended_at - sent_at) * 1000.0,
                "attempts": end.attempts if end else 0,
                "at": now,
                # for the provider/model labels and the token counters (once per call, so
                # coalesced followers are not counted again)
                "model": msg.model,
                "input_tokens": _tokens(usage, "prompt_tokens"),
                "output_tokens": _tokens(usage, "completion_tokens"),
            }
        )
        if requested is not None and outcome == "cancelled":
            out += self._record(
                {
                    "kind": "cancel",
                    "stream_id": stream_id,
                    "cancel_ms": (now - requested) * 1000.0,
                    "at": now,
                    "provider": msg.provider,
                    "model": msg.model,
                }
            )
        return out + self._flush_timer()

    def retrying(
        self, stream_id: str, account: str, key: int, reason: str, attempt: int, pause_s: float, now: float
    ) -> list[Effect]:
        """Attempt `attempt` of the call failed before its first byte (`reason`) and the
        host tries again: a 429's pause goes to the Pacer, the retry to Metrics."""
        call = self.calls.get(stream_id)
        if call is None:
            return []
        out: list[Effect] = []
        if pause_s > 0:
            out.append(Send(roles.pacer(account), m.AccountPause(account, pause_s, key)))
        out += self._record(
            {"kind": "retry", "provider": call.open.provider, "reason": reason, "attempt": attempt + 1, "at": now}
        )
        return out + self._flush_timer()

    # --- slice-opened notices ----------------------------------------------------------------
    def _take_opened(self, pacer: str) -> list[str]:
        """The unreported slice-opened calls of `pacer`, now reported."""
        ids = [sid for sid, (p, _) in self.unreported.items() if p == pacer]
        for sid in ids:
            del self.unreported[sid]
        return ids

    def _send_opened(self, now: float) -> list[Effect]:
        """What no release carried within OPENED_FLUSH_S: one SliceOpened per Pacer, with
        every call of it waiting (the younger ones ride along)."""
        if not self.unreported:
            return []
        oldest = next(iter(self.unreported.values()))[1]  # in the order they opened
        if now - oldest < OPENED_FLUSH_S - 1e-9:  # the one the timer was set for was released
            return self._opened_timer(now)
        out: list[Effect] = []
        for pacer in sorted({p for p, _ in self.unreported.values()}):
            out.append(Send(pacer, m.SliceOpened(self.role, self._take_opened(pacer))))
        return out

    def _opened_timer(self, now: float) -> list[Effect]:
        """One timer, due when the oldest unreported call has waited OPENED_FLUSH_S."""
        if self._opened_set or not self.unreported:
            return []
        self._opened_set = True
        oldest = next(iter(self.unreported.values()))[1]
        return [After(max(0.0, oldest + OPENED_FLUSH_S - now), FlushOpened())]

    # --- records ----------------------------------------------------------------------------
    def flush(self, now: float) -> list[Effect]:
        """The pending records, and the active-streams gauge if it changed, to Metrics."""
        active = len(self.calls)
        if active != self.reported_active:  # the gauge only when it changed: no idle chatter
            self.reported_active = active
            # One series per Pool; Metrics reports their sum (the gateway's open streams).
            gauge = {"kind": "gauge", "name": "active_streams", "labels": {"pool": self.role}, "value": active}
            self.records.append({**gauge, "at": now})
        return self._send_records()

    def flush_with_gauge(self, now: float) -> list[Effect]:
        """`flush`, with the active-streams gauge whether it changed or not (for a Metrics
        actor that has not had it: the first, or a replacement)."""
        self.reported_active = None
        return self.flush(now)

    def _record(self, record: dict) -> list[Effect]:
        self.records.append(record)
        return self._send_records() if len(self.records) >= RECORD_BATCH else []

    def _send_records(self) -> list[Effect]:
        if not self.records:
            return []
        batch, self.records = self.records, []
        return [Send(roles.METRICS, m.Records(self.role, batch))]

    def _flush_timer(self) -> list[Effect]:
        """One flush timer while something waits to be reported."""
        if self._flush_set or not (self.records or len(self.calls) != self.reported_active):
            return []
        self._flush_set = True
        return [After(RECORD_FLUSH_S, FlushRecords())]

    @staticmethod
    def _terminal(outcome: str, error: dict | None) -> dict:
        if outcome == "cancelled":
            return ev.error("cancelled", CANCELLED)
        if error is not None:
            return error
        return ev.error("internal_error", "pool: the upstream call ended without a terminal event")

    def state(self) -> dict:
        return {
            "open_calls": sorted(self.calls),
            "pending_records": len(self.records),
            "unreported_opens": len(self.unreported),
        }


def _tokens(usage: dict, field: str) -> int | None:
    """A token count from the provider's usage, or None (absent, or not a count)."""
    n = usage.get(field)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
