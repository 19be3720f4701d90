"""When the Pool tries a failed upstream call again: the decision, as plain code.

A call may be retried only while nothing of it has reached a client (no provider byte of
a 200 body was published), so a retry is invisible to everyone listening, coalesced
followers included. This module decides *whether* and *when*; the Pool carries it out
(actors/pool.py). No I/O, no clock (callers pass `now`), so it is unit-tested directly.

What is retried (a `Failure`'s `reason`, also the label of
`sluice_upstream_retries_total{reason}`):

    reset     the connection or stream broke before the first byte (a pooled connection
              the provider had closed, a RST_STREAM before the headers): at once
    connect   no connection could be made: after a short backoff (UPSTREAM_RETRY_BACKOFF_S)
    timeout   no byte within the read timeout (UPSTREAM_READ_TIMEOUT_S): at once, on a new
              stream (the stalled one is reset where its headers arrived); never for a
              tools request, and with the default timeout (60 s) past the deadline (15 s),
              so only a deployment with a short read timeout retries a stall
    5xx       500, 502, 503, 504, 529 (overloaded): after a short backoff, or Retry-After
    429       rate limited: after its Retry-After (1 s when it gives none), and the
              account's Pacer pauses for as long (`Decision.pause_s`)

Bounds, all of which must allow a retry:
    attempts   at most `max_attempts` calls in all (UPSTREAM_MAX_ATTEMPTS)
    deadline   the retry must start within `deadline_s` of the first attempt
               (UPSTREAM_RETRY_DEADLINE_S); a Retry-After beyond it is not waited for
    budget     per account, retries in the last `budget_window_s` may be at most
               `budget_ratio` x the calls in it, or `budget_min`, whichever is more
               (UPSTREAM_RETRY_BUDGET, UPSTREAM_RETRY_MIN): a provider that fails every
               call gets ~1.2x its calls, not 3x (no retry storm)
    idempotent a request with tools / tool_choice / functions may have had effects: it is retried
               only when the provider says it did not process it (`unprocessed`: connect
               errors, 429, RST_STREAM REFUSED_STREAM)
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocols.gateway_settings import Settings
from protocols.keys import is_idempotent  # noqa: F401  (the Pool asks here: one place for the rule)

RESET, CONNECT, SERVER, RATE_LIMITED, TIMEOUT = "reset", "connect", "5xx", "429", "timeout"
REASONS = (RESET, CONNECT, SERVER, RATE_LIMITED, TIMEOUT)

RETRYABLE_STATUSES = frozenset({500, 502, 503, 504, 529})  # 529: Anthropic "overloaded"


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 3
    deadline_s: float = 15.0
    budget_ratio: float = 0.2
    budget_min: int = 5
    budget_window_s: float = 10.0
    backoff_s: float = 0.1  # connect / 5xx: 0.1 s, 0.2 s, ... (x 0.5..1 jitter)
    default_429_s: float = 1.0  # a 429 without Retry-After

    @classmethod
    def from_config(cls, settings: Settings) -> RetrySettings:
        return cls(
            max_attempts=settings.upstream_max_attempts,
            deadline_s=settings.upstream_retry_deadline_s,
            budget_ratio=settings.upstream_retry_budget,
            budget_min=settings.upstream_retry_min,
            backoff_s=settings.upstream_retry_backoff_s,
        )


@dataclass(frozen=True)
class Failure:
    """What went wrong before the first byte, as far as a retry cares."""

    reason: str  # one of REASONS
    unprocessed: bool = False  # the provider says it did not act on the request
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float = 0.0
    pause_s: float = 0.0  # pause the account's Pacer this long (a 429)
    why_not: str = ""  # "max_attempts" | "non_idempotent" | "deadline" | "budget"


def failure_of_status(status: int, retry_after_s: float | None) -> Failure | None:
    """The Failure for an HTTP error status, None when no retry can help (4xx, 501...)."""
    if status == 429:
        return Failure(RATE_LIMITED, unprocessed=True, retry_after_s=retry_after_s)
    if status in RETRYABLE_STATUSES:
        return Failure(SERVER, retry_after_s=retry_after_s)
    return None


class RetryBudget:
    """One account's calls and retries over a sliding window."""

    def __init__(self, ratio: float, minimum: int, window_s: float):
        self.ratio, self.minimum, self.window_s = ratio, minimum, window_s
        self.calls: deque[float] = deque()
        self.retries: deque[float] = deque()

    def note_call(self, now: float) -> None:
        self.calls.append(now)

    def allows(self, now: float) -> bool:
        for times in (self.calls, self.retries):
            while times and times[0] <= now - self.window_s:
                times.popleft()
        return len(self.retries) < max(self.minimum, self.ratio * len(self.calls))

    def spend(self, now: float) -> None:
        self.retries.append(now)


@dataclass
class RetryPolicy:
    settings: RetrySettings = field(default_factory=RetrySettings)
    jitter: Callable[[], float] = random.random  # 0..1; tests pass a constant
    budgets: dict[str, RetryBudget] = field(default_factory=dict)

    def budget(self, account: str) -> RetryBudget:
        s = self.settings
        if account not in self.budgets:
            self.budgets[account] = RetryBudget(s.budget_ratio, s.budget_min, s.budget_window_s)
        return self.budgets[account]

    def note_call(self, account: str, now: float) -> None:
        """A new upstream call (its first attempt): it earns the budget its share."""
        self.budget(account).note_call(now)

    def decide(
        self, account: str, failure: Failure, attempt: int, idempotent: bool, first_sent_at: float, now: float
    ) -> Decision:
        """After attempt number `attempt` (1-based) failed before its first byte with
        `failure`: try again, and after how long? Spends the budget when it says yes."""
        s = self.settings
        if attempt >= s.max_attempts:
            return Decision(False, why_not="max_attempts")
        if not idempotent and not failure.unprocessed:
            return Decision(False, why_not="non_idempotent")
        delay = self._delay(failure, attempt)
        if now + delay > first_sent_at + s.deadline_s:
            return Decision(False, why_not="deadline")
        budget = self.budget(account)
        if not budget.allows(now):
            return Decision(False, why_not="budget")
        budget.spend(now)
        return Decision(True, delay, pause_s=delay if failure.reason == RATE_LIMITED else 0.0)

    def _delay(self, failure: Failure, attempt: int) -> float:
        if failure.reason in (RESET, TIMEOUT):
            return 0.0  # a fresh connection / stream: nothing to wait for (a timeout waited already)
        if failure.reason == RATE_LIMITED:
            wait = failure.retry_after_s if failure.retry_after_s is not None else self.settings.default_429_s
            # A little later than asked, spread: calls that hit the wall together must
            # not all come back in the same millisecond.
            return wait * (1.0 + 0.1 * self.jitter())
        if failure.retry_after_s is not None:
            return failure.retry_after_s
        return self.settings.backoff_s * 2 ** (attempt - 1) * (0.5 + 0.5 * self.jitter())
