"""A circuit breaker for one API key of one account: closed, open, half-open.

    closed     --N failed calls in a row, or a failure share over a window-->  open
    open       --cool-down over (10 s, doubling after each failed probe, capped)-->  half-open
    half-open  --the one probe call succeeds-->  closed
               --it fails-->  open again, for twice as long

While open, the key's budget is not used (the Pacer grants on the account's other keys,
falls back, or fails fast). Half-open lets exactly one call through: the probe. A call's
verdict comes from the Pool in `LeaseRelease.key_results`: "ok" once a provider byte of a
200 arrived, "fail" for what a retry could not fix before the first byte (docs/reliability.md,
"Fallbacks and circuit breakers"). Calls that were cancelled, or failed for the request's
own fault (400, 404, ...), give no verdict.

Plain code driven by `now`: no clock, no I/O (tests/test_circuit.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocols.gateway_settings import Settings

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# The value of sluice_circuit_state{account,key}.
STATE_VALUE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
EPS = 1e-9


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    failures: int = 5  # failed calls in a row that open the circuit (0: the breaker is off)
    failure_rate: float = 0.5  # ... or this share of the calls in the last window_s ...
    min_calls: int = 10  # ... once the window holds at least this many calls
    window_s: float = 30.0
    open_s: float = 10.0  # the first cool-down
    max_open_s: float = 120.0  # the cool-down doubles after each failed probe, up to this

    @classmethod
    def from_config(cls, settings: Settings) -> CircuitSettings:
        open_s = settings.circuit_open_s
        return cls(
            failures=settings.circuit_failures,
            failure_rate=settings.circuit_failure_rate,
            window_s=settings.circuit_window_s,
            open_s=open_s,
            max_open_s=max(settings.circuit_max_open_s, open_s),
        )


@dataclass
class CircuitBreaker:
    settings: CircuitSettings = field(default_factory=CircuitSettings)
    state: str = CLOSED
    consecutive: int = 0  # failed calls in a row (closed)
    opened_at: float = 0.0
    open_for: float = 0.0  # the current cool-down
    probing: bool = False  # half-open: the probe call is out
    opens_total: int = 0
    recent: deque = field(default_factory=deque)  # (at, ok) of the calls in the window (closed)

    @property
    def half_opens_at(self) -> float:
        return self.opened_at + self.open_for

    def refresh(self, now: float) -> str | None:
        """Time passed: an open circuit whose cool-down is over half-opens. The new state
        when it changed, else None."""
        if self.state == OPEN and now >= self.half_opens_at - EPS:
            self.state, self.probing = HALF_OPEN, False
            return HALF_OPEN
        return None

    def allows(self) -> bool:
        """May a call be granted on this key now (refresh first)?"""
        return self.state == CLOSED or (self.state == HALF_OPEN and not self.probing)

    def granted(self) -> bool:
        """A call was granted on this key; True when it is the half-open probe."""
        if self.state == HALF_OPEN:
            self.probing = True
            return True
        return False

    def abandoned(self) -> None:
        """The probe ended without a verdict (cancelled): let another call probe."""
        if self.state == HALF_OPEN:
            self.probing = False

    def record(self, ok: bool, now: float) -> str | None:
        """A call's verdict. The new state when it changed, else None."""
        if self.settings.failures == 0:
            return None  # switched off: never opens (so never half-opens either)
        if self.state == HALF_OPEN:
            if ok:
                self.state, self.consecutive, self.open_for, self.probing = CLOSED, 0, 0.0, False
                self.recent.clear()
                return CLOSED
            return self._open(now, longer=True)
        if self.state == OPEN:
            return None  # a call granted before it opened: the probe decides, not this
        self.recent.append((now, ok))
        while self.recent and self.recent[0][0] <= now - self.settings.window_s:
            self.recent.popleft()
        if ok:
            self.consecutive = 0
            return None
        self.consecutive += 1
        failed = sum(1 for _at, good in self.recent if not good)
        s = self.settings
        if self.consecutive >= s.failures or (
            len(self.recent) >= s.min_calls and failed >= s.failure_rate * len(self.recent)
        ):
            return self._open(now, longer=False)
        return None

    def _open(self, now: float, longer: bool) -> str:
        s = self.settings
        self.open_for = min(s.max_open_s, self.open_for * 2) if longer and self.open_for else s.open_s
        self.state, self.opened_at, self.probing, self.consecutive = OPEN, now, False, 0
        self.recent.clear()
        self.opens_total += 1
        return OPEN
