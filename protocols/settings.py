"""The settings an operator changes live, as small frozen types with their validation:
the Pacer's (`PacerSettings`), the Coalescer shards' flags (`CoalescerFlags`) and the
Metrics actor's alert thresholds.

Defined here, in protocols/, because two sides need the same schema: the actors that
apply a change (actors/pacer_logic.py, actors/coalescer.py, actors/alerts.py) and the
admin surface that checks a command before anything is sent (edge/admin_routes.py,
edge/admin_cli.py), so that an invalid command changes no actor. Pure code: no I/O.
Each validator raises ValueError naming the bad key or value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

# Upper bounds of the live settings: far beyond any real budget, and small enough that every
# value stays one that msgpack and JSON carry (an int beyond 2^64 cannot be put in the
# actor's State reply: /readyz and `show` failed for good) and one that Thespian's timers
# (datetime arithmetic) can wait for (a delay of 1e15 s or inf raised in the actor).
MAX_COUNT = 1_000_000_000
MAX_SECONDS = 365 * 86400.0  # a year


# --- the Pacer (one per account) ------------------------------------------------------------


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
        if not 1 <= self.burst <= MAX_COUNT:
            problems.append(f"burst must be >= 1 and <= {MAX_COUNT}")
        if not 1 <= self.concurrency <= MAX_COUNT:
            problems.append(f"concurrency must be >= 1 and <= {MAX_COUNT}")
        if self.rpm is not None and not 1 <= self.rpm <= MAX_COUNT:
            problems.append(f"rpm must be >= 1 and <= {MAX_COUNT}, or unset")
        if not 0 <= self.max_queue <= MAX_COUNT:
            problems.append(f"max_queue must be >= 0 and <= {MAX_COUNT}")
        if not (0 < self.max_wait_s <= MAX_SECONDS):  # NaN and inf fail here too
            problems.append(f"max_wait_s must be > 0 and <= {MAX_SECONDS:.0f} (a year)")
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


# --- the Coalescer shards ---------------------------------------------------------------------


@dataclass(frozen=True)
class CoalescerFlags:
    coalesce_enabled: bool = True
    stream_fanout_enabled: bool = True
    error_ttl_s: float = 2.0


FLAG_TYPES = {"coalesce_enabled": bool, "stream_fanout_enabled": bool, "error_ttl_s": float}


def flags_from(base: CoalescerFlags, changes: dict) -> CoalescerFlags:
    """Apply admin changes; ValueError names the bad key or value (state unchanged)."""
    values: dict[str, Any] = {}
    for key, value in changes.items():
        kind = FLAG_TYPES.get(key)
        if kind is None:
            raise ValueError(f"unknown coalescer flag {key!r} (known: {sorted(FLAG_TYPES)})")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        if kind is float and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SECONDS
        ):  # NaN and inf fail the range too
            raise ValueError(f"{key} must be a number >= 0 and <= {MAX_SECONDS:.0f} (a year), got {value!r}")
        values[key] = kind(value)
    return replace(base, **values)


# --- the alert rules' thresholds (actors/alerts.py says what each rule does with them) ----------

ALERT_DEFAULTS: dict[str, float | int] = {
    "ttft_p95_ms": 1500.0,
    "ttft_for_s": 300.0,
    "perf_window": 100,  # last_n for the TTFT and queue-wait rules
    "error_rate": 0.01,
    "error_window": 100,
    "error_for_s": 0.0,
    "queue_wait_p95_ms": 1000.0,
    "queue_wait_for_s": 300.0,
    "coalesce_min_ratio": 10.0,
    "coalesce_for_s": 0.0,
    "burst_min_requests": 50,
    "burst_window_s": 10.0,
}

# key -> (kind, lower bound, lower bound inclusive?, upper bound exclusive or None)
_SPEC = {
    "ttft_p95_ms": ("number", 0.0, False, None),
    "queue_wait_p95_ms": ("number", 0.0, False, None),
    "ttft_for_s": ("number", 0.0, True, None),
    "error_for_s": ("number", 0.0, True, None),
    "queue_wait_for_s": ("number", 0.0, True, None),
    "coalesce_for_s": ("number", 0.0, True, None),
    # a fraction: 0.01 means 1 %. Values >= 1 can never be exceeded, so they are
    # almost certainly a percent written by mistake.
    "error_rate": ("number", 0.0, True, 1.0),
    "coalesce_min_ratio": ("number", 0.0, True, None),
    "burst_window_s": ("number", 0.0, False, None),
    "perf_window": ("int", 1, True, None),
    "error_window": ("int", 1, True, None),
    "burst_min_requests": ("int", 1, True, None),
}


def validate_thresholds(thresholds: dict | None) -> dict:
    """Return a cleaned copy of `thresholds`; ValueError naming the first bad key."""
    if thresholds is None:
        return {}
    if not isinstance(thresholds, dict):
        raise ValueError("thresholds must be a dict")
    clean: dict = {}
    for key, value in thresholds.items():
        if key not in _SPEC:
            raise ValueError(f"unknown alert threshold {key!r}; known: {', '.join(sorted(_SPEC))}")
        kind, low, low_inclusive, high = _SPEC[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"alert threshold {key!r} must be a number, got {value!r}")
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"alert threshold {key!r} must be an integer, got {value!r}")
            value = int(value)
            if value > MAX_COUNT:  # 1e30 is an integral float: as an int, no message can carry it
                raise ValueError(f"alert threshold {key!r} must be <= {MAX_COUNT}, got {value!r}")
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"alert threshold {key!r} must be finite, got {value!r}")
        if value < low or (value == low and not low_inclusive):
            op = ">=" if low_inclusive else ">"
            raise ValueError(f"alert threshold {key!r} must be {op} {low}, got {value!r}")
        if high is not None and value >= high:
            raise ValueError(f"alert threshold {key!r} must be < {high}, got {value!r}")
        clean[key] = value
    return clean


# --- one provider the gateway serves (config.load's settings.providers[name]) ---------------


@dataclass(frozen=True)
class ProviderConfig:
    """One entry of `Settings.providers` (protocols/gateway_settings.py), built by
    protocols/config.py; on the wire a plain map of these fields (`Settings.to_wire`)."""

    account: str  # the environment prefix: whose rate limit one Pacer guards
    adapter: str  # the sans-I/O adapter in protocols/providers
    base_url: str
    model: str
    api_keys: tuple[str | None, ...] = (None,)  # "#1" is api_keys[0]; (None,): no key (a local provider)
    h2c: bool = False  # HTTP/2 with prior knowledge to an http:// base URL
    keepalive_s: float = 4.0  # idle pooled connections are closed after this
