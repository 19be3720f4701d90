"""The Metrics actor's logic: measurement records in, percentiles and Prometheus text out.

This module owns:
  * validating the measurement records every other part of sluice sends (`Records`
    messages, see protocols/messages.py) and counting the ones it cannot use;
  * bounded ring buffers of the last `capacity` request / upstream / cancel records,
    from which `performance(last_n)` computes nearest-rank percentiles (this is what
    `GET /api/metrics/performance?last_n=...` returns);
  * cumulative counters and fixed-bucket histograms since start, rendered by hand as
    Prometheus text exposition format 0.0.4 (`prometheus()`), so the product needs no
    Prometheus client library;
  * the latest value of each gauge.

It does no I/O and reads no clock: the Thespian actor that hosts it passes `now`
(wall-clock float seconds) into every call. Alert rules live in actors/alerts.py.

Record kinds (a batch is a list of dicts; unknown extra fields are ignored so senders can
add fields before this module reads them):

  request   {"kind":"request", "request_id":str, "role":"leader"|"follower",
             "outcome":"done"|"error"|"cancelled"|"rejected", "error_code":str|None,
             "ttft_ms":float|None, "queue_wait_ms":float|None, "latency_ms":float,
             "at":float,
             optional: "provider":str, "model":str, "key_id":str|None,
                       "provider_ttft_ms":float|None}
                                             -- one per client request, from the edge;
                                             provider_ttft_ms only on a leader whose
                                             call reached its first byte
  upstream  {"kind":"upstream", "stream_id":str, "provider":str,
             "outcome":"done"|"error"|"cancelled", "error_code":str|None,
             "upstream_ttft_ms":float|None, "latency_ms":float, "at":float,
             optional: "model":str, "input_tokens":int|None, "output_tokens":int|None}
                                             -- one per upstream call, from the Pool
  cancel    {"kind":"cancel", "stream_id":str, "cancel_ms":float, "at":float,
             optional: "provider":str, "model":str}
                                             -- cancel request -> upstream abort
  retry     {"kind":"retry", "provider":str, "reason":"reset"|"connect"|"5xx"|"429",
             "attempt":int, "at":float}     -- one per upstream retry, from the Pool
                                             (counted in sluice_upstream_retries_total)
  circuit   {"kind":"circuit", "account":str, "key":"#n", "state":"closed"|"open"|"half_open",
             "at":float}                     -- a key's circuit changed, from its Pacer
                                             (sluice_circuit_opens_total, sluice_circuit_state)
  fallback  {"kind":"fallback", "from":str, "to":str, "reason":str, "at":float}
                                             -- a call sent to a fallback provider
                                             (sluice_fallbacks_total)
  gauge     {"kind":"gauge", "name":"active_streams"|"pacer_queue_depth"|"pacer_tokens"|"pacer_leases"|
                                     "pacer_paused_seconds"|"circuit_state",
             "labels":{str:str}, "value":float, "at":float}
                                             -- latest `at` wins per (name, labels)

Labels and their bounds (docs/operations.md has the metrics table): `provider` (at most
MAX_PROVIDERS, then "other"), `model` (the first MAX_MODELS_PER_PROVIDER seen per provider,
then "other"), `key_id` (at most MAX_KEY_IDS, then "other"; only present with client
keys), `error_type` (at most MAX_ERROR_TYPES codes, then "other"). A record without
provider or model (an older sender) is labelled "unknown". Folding rather than rejecting:
the request still counts, only its label is coarser. Added TTFT is `ttft_ms -
provider_ttft_ms` of one request record (both measured on one clock each: the edge's and
the Pool's), clamped at 0.

A record is rejected (counted in `rejected_records`, never raised) when it is not a dict,
has an unknown kind, misses a field, has a field of the wrong type, has an enum value
outside the lists above, or has a duration that is negative, NaN or infinite (such a
value would poison every percentile and histogram after it).

Definitions used by `performance(last_n, now)`:
  * the window is the last `last_n` request records *received* (arrival order, not `at`
    order); `window.from` / `window.to` are the smallest / largest `at` among them;
  * ttft_ms, queue_wait_ms, latency_ms, provider_ttft_ms, added_ttft_ms: nearest-rank
    p50/p95/p99 over the window's non-None samples; `count` is the number of such samples;
  * by_provider: the same window split by (provider, model) label: requests, error_rate,
    and the five stats above (optional key: older readers ignore it);
  * cancel_ms: nearest-rank over the last `last_n` cancel records (their own window);
  * error_rate: requests with outcome "error" or "rejected" / requests in the window
    (0.0 for an empty window); "cancelled" is the client leaving, not an error;
  * coalesce: leaders and followers by the `role` the edge reported;
  * upstream_calls: upstream records (still in the ring) whose `at` (the call's end)
    lies between the earliest arrival in the window (`at - latency_ms`) and window.to;
    0 for an empty window. Upstream and request records come
    from different actors, so a count window cannot be shared; the time span is the
    only common axis;
  * active_streams: the sum of the latest `active_streams` gauge over all label sets
    (one per Pool / edge that reports it), 0 when none was reported.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable
from itertools import islice
from typing import Any, NamedTuple

from actors.circuit import OPEN, STATE_VALUE
from actors.retry_policy import REASONS as RETRY_REASONS

# Bucket upper bounds in seconds. 1 and 1.5 are the queue-wait and TTFT alert thresholds,
# so `histogram_quantile(...) > threshold` in docs/prometheus-alerts.yml compares against
# a bucket boundary and is not blurred by interpolation. The tail (60, 120) is there for
# whole-response durations, which for LLMs run to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

ROLES = ("leader", "follower")
REQUEST_OUTCOMES = ("done", "error", "cancelled", "rejected")
UPSTREAM_OUTCOMES = ("done", "error", "cancelled")
GAUGE_NAMES = (
    "active_streams",
    "pacer_queue_depth",
    "pacer_tokens",
    "pacer_leases",
    "pacer_paused_seconds",
    "circuit_state",
)
CIRCUIT_STATES = tuple(STATE_VALUE)
PERCENTILES = (50, 95, 99)

# Cardinality caps: a sender bug (a request id used as a label, say) must not grow the
# actor's memory or the scrape without bound. Series past the cap are rejected records.
MAX_GAUGE_SERIES = 1000
MAX_PROVIDERS = 100
# Label values past these caps fold into OTHER (the request still counts).
MAX_MODELS_PER_PROVIDER = 50
MAX_KEY_IDS = 1000
MAX_ERROR_TYPES = 50
OTHER = "other"
UNKNOWN = "unknown"  # a record that names no provider or model

# Histogram families: key -> (metric name, help). Labels: provider, model. Kept without
# key_id: 17 series per label set is where the cardinality of a histogram goes.
_HISTOGRAMS = {
    "ttft": (
        "sluice_ttft_seconds",
        "Time to first token as the client sees it: request received -> first byte written by the edge.",
    ),
    "provider_ttft": (
        "sluice_provider_ttft_seconds",
        "Provider's time to first token: request sent (first attempt) -> first provider byte; leaders only.",
    ),
    "added_ttft": (
        "sluice_added_ttft_seconds",
        "What sluice added to a leader's TTFT: client TTFT - provider TTFT (admission, queue, hub, edge).",
    ),
    "queue_wait": ("sluice_queue_wait_seconds", "Time a request waited for a pacer lease."),
    "cancel": ("sluice_cancel_latency_seconds", "Time from a cancel request to the upstream abort."),
    "duration": ("sluice_request_duration_seconds", "Whole client request duration."),
}
# Counter families: key -> (metric name, help).
_COUNTERS = {
    "requests": (
        "sluice_requests_total",
        "Client requests by provider, model, outcome and role (and key_id with client keys).",
    ),
    "request_errors": (
        "sluice_request_errors_total",
        "Client requests that ended in an error or were rejected, by error_type (sluice's code).",
    ),
    "upstream_calls": ("sluice_upstream_calls_total", "Upstream provider calls by provider, model and outcome."),
    "upstream_errors": ("sluice_upstream_errors_total", "Upstream calls that ended in an error, by error_type."),
    "tokens": (
        "sluice_upstream_tokens_total",
        "Tokens the provider reported in its usage, by token_type (input, output); once per upstream call.",
    ),
    "leaders": ("sluice_coalesce_leaders_total", "Requests that led an upstream call."),
    "followers": ("sluice_coalesce_followers_total", "Requests served by joining an identical in-flight call."),
}

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class _Request(NamedTuple):
    role: str
    outcome: str
    ttft_ms: float | None
    queue_wait_ms: float | None
    latency_ms: float
    at: float
    provider: str = UNKNOWN
    model: str = UNKNOWN
    provider_ttft_ms: float | None = None

    @property
    def added_ttft_ms(self) -> float | None:
        """What sluice added to the client's TTFT: its TTFT less the provider's."""
        if self.ttft_ms is None or self.provider_ttft_ms is None:
            return None
        return max(0.0, self.ttft_ms - self.provider_ttft_ms)


class _Upstream(NamedTuple):
    provider: str
    outcome: str
    at: float


class _Cancel(NamedTuple):
    cancel_ms: float
    at: float


class _LabelBudget:
    """Bounded label values: the first ones seen are kept, later ones fold into OTHER,
    so a client sending 1,000 model names (or a sender bug) cannot grow the scrape."""

    def __init__(self) -> None:
        self._models: dict[str, set[str]] = {}  # provider -> models kept
        self._keys: set[str] = set()
        self._errors: set[str] = set()

    def provider_model(self, provider: str | None, model: str | None) -> tuple[str, str]:
        provider, model = provider or UNKNOWN, model or UNKNOWN
        if provider not in self._models:
            if len(self._models) >= MAX_PROVIDERS:
                return OTHER, OTHER
            self._models[provider] = set()
        models = self._models[provider]
        if model not in models:
            if len(models) >= MAX_MODELS_PER_PROVIDER:
                return provider, OTHER
            models.add(model)
        return provider, model

    def key_id(self, key_id: str | None) -> str | None:
        return None if key_id is None else _capped(self._keys, key_id, MAX_KEY_IDS)

    def error_type(self, code: str) -> str:
        return _capped(self._errors, code, MAX_ERROR_TYPES)


def _capped(seen: set[str], value: str, cap: int) -> str:
    if value not in seen:
        if len(seen) >= cap:
            return OTHER
        seen.add(value)
    return value


class _Malformed(Exception):
    """Internal: a record failed validation (never leaves this module)."""


# --- validation helpers -------------------------------------------------------------


def _number(rec: dict, key: str, *, duration: bool = False, optional: bool = False) -> Any:
    if key not in rec:
        raise _Malformed(key)
    v = rec[key]
    if v is None and optional:
        return None
    # bool is an int subclass; True as a latency is a sender bug, not 1 ms.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Malformed(key)
    v = float(v)
    if not math.isfinite(v) or (duration and v < 0):
        raise _Malformed(key)
    return v


def _string(rec: dict, key: str, *, optional: bool = False, choices: Any = None) -> Any:
    if key not in rec:
        raise _Malformed(key)
    v = rec[key]
    if v is None and optional:
        return None
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise _Malformed(key)
    return v


def _optional_string(rec: dict, key: str) -> str | None:
    """A field newer senders add: absent or None is None, anything but a str is malformed."""
    v = rec.get(key)
    if v is not None and not isinstance(v, str):
        raise _Malformed(key)
    return v


def _count_field(rec: dict, key: str) -> int | None:
    """A token count: absent or None is None; a negative, fractional or non-int is malformed."""
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Malformed(key)
    return v


def _labels(rec: dict) -> tuple[tuple[str, str], ...]:
    labels = rec.get("labels", {})
    if labels is None:
        labels = {}
    if not isinstance(labels, dict):
        raise _Malformed("labels")
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_NAME.match(k) or k.startswith("__"):
            raise _Malformed("labels")
        if not isinstance(v, str):
            raise _Malformed("labels")
    return tuple(sorted(labels.items()))


def nearest_rank(sorted_samples: list[float], p: int) -> float | None:
    """Nearest-rank percentile: the smallest sample with at least p% of samples <= it.

    Integer arithmetic for the rank (ceil(p*n/100)) so that 0.95*100 rounding cannot move
    the rank by one.
    """
    n = len(sorted_samples)
    if n == 0:
        return None
    rank = max(1, -(-p * n // 100))
    return sorted_samples[rank - 1]


def _stats(samples: Iterable[float | None]) -> dict:
    values = sorted(v for v in samples if v is not None)
    out = {f"p{p}": nearest_rank(values, p) for p in PERCENTILES}
    out["count"] = len(values)
    return out


def _breakdown(reqs: list[_Request]) -> list[dict]:
    """The window's requests split by (provider, model) label, sorted by label."""
    groups: dict[tuple[str, str], list[_Request]] = {}
    for r in reqs:
        groups.setdefault((r.provider, r.model), []).append(r)
    out = []
    for (provider, model), group in sorted(groups.items()):
        errors = sum(1 for r in group if r.outcome in ("error", "rejected"))
        out.append(
            {
                "provider": provider,
                "model": model,
                "requests": len(group),
                "error_rate": errors / len(group),
                "ttft_ms": _stats(r.ttft_ms for r in group),
                "provider_ttft_ms": _stats(r.provider_ttft_ms for r in group),
                "added_ttft_ms": _stats(r.added_ttft_ms for r in group),
                "queue_wait_ms": _stats(r.queue_wait_ms for r in group),
                "latency_ms": _stats(r.latency_ms for r in group),
            }
        )
    return out


class _Histogram:
    """Cumulative since start; reset() does not clear it (Prometheus counters must only
    grow, and a scrape-side rate() handles windows)."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)  # per bucket, not cumulative; summed on render
        self.inf = 0  # observations above the last finite bound
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.inf += 1
        self.sum += seconds
        self.count += 1


Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: one series


def _series(**labels: str | None) -> Labels:
    """A series key; a None value (no key_id under open access) leaves the label out."""
    return tuple(sorted((k, v) for k, v in labels.items() if v is not None))


class MetricsLogic:
    """State of the Metrics actor. See the module docstring for record kinds and
    definitions."""

    def __init__(self, capacity: int = 100_000) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError("capacity must be a positive int")
        self.capacity = capacity
        self._requests: deque[_Request] = deque(maxlen=capacity)
        self._upstreams: deque[_Upstream] = deque(maxlen=capacity)
        self._cancels: deque[_Cancel] = deque(maxlen=capacity)
        self._labels = _LabelBudget()
        self._seeded: set[Labels] = set()  # (provider, model, key_id) whose request series exist
        # (name, labels tuple) -> (value, at)
        self._gauges: dict[tuple[str, tuple], tuple[float, float]] = {}
        # cumulative since start, never reset; counter name -> series -> value
        self._counters: dict[str, dict[Labels, float]] = {name: {} for name in _COUNTERS}
        self._retries_total: dict[tuple[str, str], int] = {}  # (provider, reason)
        self._circuit_opens: dict[tuple[str, str], int] = {}  # (account, key)
        self._fallbacks_total: dict[tuple[str, str], int] = {}  # (from provider, to provider)
        # histogram name -> series (provider, model) -> histogram
        self._hist: dict[str, dict[Labels, _Histogram]] = {name: {} for name in _HISTOGRAMS}
        self.rejected_records = 0
        self.accepted_records = 0
        self.last_ingest_at: float | None = None
        self.reset_at: float | None = None

    def _count(self, name: str, series: Labels, by: float = 1) -> None:
        family = self._counters[name]
        family[series] = family.get(series, 0) + by

    def _observe(self, name: str, series: Labels, ms: float | None) -> None:
        if ms is None:
            return
        family = self._hist[name]
        h = family.get(series)
        if h is None:
            h = family[series] = _Histogram()
        h.observe(ms / 1000.0)

    # --- input ----------------------------------------------------------------------

    def ingest(self, records: list[dict], now: float) -> None:
        """Take one batch. Bad records are counted and skipped; this never raises."""
        self.last_ingest_at = now
        if not isinstance(records, (list, tuple)):
            self.rejected_records += 1
            return
        for rec in records:
            try:
                self._ingest_one(rec)
            except Exception:  # _Malformed, or an unforeseen shape: never crash the actor
                self.rejected_records += 1
            else:
                self.accepted_records += 1

    def _provider_model(self, rec: dict) -> tuple[str, str]:
        provider = _optional_string(rec, "provider")
        model = _optional_string(rec, "model")
        return self._labels.provider_model(provider, model)

    def _ingest_one(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            raise _Malformed("record")
        kind = rec.get("kind")
        if kind == "request":
            _string(rec, "request_id")
            role = _string(rec, "role", choices=ROLES)
            outcome = _string(rec, "outcome", choices=REQUEST_OUTCOMES)
            ttft_ms = _number(rec, "ttft_ms", duration=True, optional=True)
            queue_wait_ms = _number(rec, "queue_wait_ms", duration=True, optional=True)
            latency_ms = _number(rec, "latency_ms", duration=True)
            at = _number(rec, "at")
            error_code = _string(rec, "error_code", optional=True)
            provider_ttft_ms = (
                _number(rec, "provider_ttft_ms", duration=True, optional=True) if "provider_ttft_ms" in rec else None
            )
            key_id = _optional_string(rec, "key_id")
            # Validation is complete before any state changes, so a bad record leaves
            # no partial trace.
            provider, model = self._provider_model(rec)
            r = _Request(role, outcome, ttft_ms, queue_wait_ms, latency_ms, at, provider, model, provider_ttft_ms)
            self._requests.append(r)
            pm = _series(provider=provider, model=model)
            key_id = self._labels.key_id(key_id)
            if _series(provider=provider, model=model, key_id=key_id) not in self._seeded:
                # every outcome x role exists from the first request on, so rate() works
                self._seeded.add(_series(provider=provider, model=model, key_id=key_id))
                self._count("leaders", pm, 0)
                self._count("followers", pm, 0)
                for o in REQUEST_OUTCOMES:
                    for ro in ROLES:
                        self._count(
                            "requests", _series(provider=provider, model=model, key_id=key_id, outcome=o, role=ro), 0
                        )
            self._count("requests", _series(provider=provider, model=model, key_id=key_id, outcome=outcome, role=role))
            self._count("leaders" if role == "leader" else "followers", pm)
            if outcome in ("error", "rejected"):
                error_type = self._labels.error_type(error_code or "unknown")
                self._count("request_errors", _series(provider=provider, model=model, error_type=error_type))
            self._observe("ttft", pm, ttft_ms)
            self._observe("provider_ttft", pm, provider_ttft_ms)
            self._observe("added_ttft", pm, r.added_ttft_ms)
            self._observe("queue_wait", pm, queue_wait_ms)
            self._observe("duration", pm, latency_ms)
        elif kind == "upstream":
            _string(rec, "stream_id")
            outcome = _string(rec, "outcome", choices=UPSTREAM_OUTCOMES)
            u = _Upstream(provider=_string(rec, "provider"), outcome=outcome, at=_number(rec, "at"))
            error_code = _string(rec, "error_code", optional=True)
            _number(rec, "upstream_ttft_ms", duration=True, optional=True)
            _number(rec, "latency_ms", duration=True)
            tokens = {t: _count_field(rec, f"{t}_tokens") for t in ("input", "output")}
            provider, model = self._provider_model(rec)
            pm = _series(provider=provider, model=model)
            self._upstreams.append(u)
            self._count("upstream_calls", _series(provider=provider, model=model, outcome=outcome))
            if outcome == "error":
                error_type = self._labels.error_type(error_code or "unknown")
                self._count("upstream_errors", _series(provider=provider, model=model, error_type=error_type))
            for token_type, n in tokens.items():
                if n is not None:
                    self._count("tokens", _series(provider=provider, model=model, token_type=token_type), n)
        elif kind == "retry":
            provider = _string(rec, "provider")
            reason = _string(rec, "reason", choices=RETRY_REASONS)
            _number(rec, "attempt")
            _number(rec, "at")
            key = (provider, reason)
            if key not in self._retries_total:
                if len({p for p, _ in self._retries_total} | {provider}) > MAX_PROVIDERS:
                    raise _Malformed("provider")
                self._retries_total[key] = 0
            self._retries_total[key] += 1
        elif kind == "circuit":
            account, key_ = _string(rec, "account"), _string(rec, "key")
            state = _string(rec, "state", choices=CIRCUIT_STATES)
            at = _number(rec, "at")
            series = (account, key_)
            if series not in self._circuit_opens and len(self._circuit_opens) >= MAX_GAUGE_SERIES:
                raise _Malformed("labels")
            self._circuit_opens.setdefault(series, 0)
            if state == OPEN:
                self._circuit_opens[series] += 1
            # The change shows in sluice_circuit_state at once, not at the next gauge report.
            self._ingest_one(
                {
                    "kind": "gauge",
                    "name": "circuit_state",
                    "labels": {"account": account, "key": key_},
                    "value": STATE_VALUE[state],
                    "at": at,
                }
            )
        elif kind == "fallback":
            series = (_string(rec, "from"), _string(rec, "to"))
            _string(rec, "reason", optional=True)
            _number(rec, "at")
            if series not in self._fallbacks_total:
                if len(self._fallbacks_total) >= MAX_PROVIDERS:
                    raise _Malformed("provider")
                self._fallbacks_total[series] = 0
            self._fallbacks_total[series] += 1
        elif kind == "cancel":
            _string(rec, "stream_id")
            c = _Cancel(cancel_ms=_number(rec, "cancel_ms", duration=True), at=_number(rec, "at"))
            provider, model = self._provider_model(rec)
            self._cancels.append(c)
            self._observe("cancel", _series(provider=provider, model=model), c.cancel_ms)
        elif kind == "gauge":
            name = _string(rec, "name", choices=GAUGE_NAMES)
            labels = _labels(rec)
            value = _number(rec, "value")
            at = _number(rec, "at")
            series = (name, labels)
            old = self._gauges.get(series)
            if old is None:
                if len(self._gauges) >= MAX_GAUGE_SERIES:
                    raise _Malformed("labels")
                self._gauges[series] = (value, at)
            elif at >= old[1]:
                # Batches from different senders can arrive out of order; the newest
                # measurement wins, not the newest delivery.
                self._gauges[series] = (value, at)
        else:
            raise _Malformed("kind")

    def reset(self, now: float) -> None:
        """Admin "reset metrics": forget the windowed samples. Counters, histograms and
        gauges are kept (they are cumulative / current state, and Prometheus expects
        counters never to go down)."""
        self._requests.clear()
        self._upstreams.clear()
        self._cancels.clear()
        self.reset_at = now

    # --- queries --------------------------------------------------------------------

    def _clamp(self, last_n: Any) -> int:
        # The edge validates last_n; this only keeps a bad value from raising here.
        try:
            n = int(last_n)
        except (TypeError, ValueError, OverflowError):
            n = 1
        return max(1, min(n, self.capacity))

    def performance(self, last_n: int, now: float) -> dict:
        n = self._clamp(last_n)
        # Newest first; order does not matter to the figures, and islice avoids copying
        # the whole ring on every query.
        reqs = list(islice(reversed(self._requests), n))
        cancels = list(islice(reversed(self._cancels), n))
        total = len(reqs)
        errors = sum(1 for r in reqs if r.outcome in ("error", "rejected"))
        leaders = sum(1 for r in reqs if r.role == "leader")
        t_from: float | None
        t_to: float | None
        if reqs:
            t_from = min(r.at for r in reqs)
            t_to = max(r.at for r in reqs)
            # An upstream call ends between its first client's arrival and its last
            # client's end (the client hears "done" after the Pool saw it), so the span
            # runs from the window's earliest arrival. A scan rather than a bisect:
            # upstream records arrive in delivery order, not `at` order.
            arrived = min(r.at - r.latency_ms / 1000.0 for r in reqs)
            upstream_calls = sum(1 for u in self._upstreams if arrived <= u.at <= t_to)
        else:
            t_from = t_to = None
            upstream_calls = 0
        return {
            "ttft_ms": _stats(r.ttft_ms for r in reqs),
            "queue_wait_ms": _stats(r.queue_wait_ms for r in reqs),
            "latency_ms": _stats(r.latency_ms for r in reqs),
            "cancel_ms": _stats(c.cancel_ms for c in cancels),
            "error_rate": errors / total if total else 0.0,
            "coalesce": {"leaders": leaders, "followers": total - leaders},
            "upstream_calls": upstream_calls,
            "active_streams": self._active_streams(),
            "window": {"last_n": n, "from": t_from, "to": t_to},
            # optional keys (added with the provider/model breakdown; readers of the
            # older shape ignore them)
            "provider_ttft_ms": _stats(r.provider_ttft_ms for r in reqs),
            "added_ttft_ms": _stats(r.added_ttft_ms for r in reqs),
            "by_provider": _breakdown(reqs),
        }

    def burst_stats(self, window_s: float, now: float) -> dict:
        """Requests whose `at` lies in [now - window_s, now], split by role.

        Used by the coalesce-ratio alert (actors/alerts.py)."""
        t0 = now - window_s
        total = leaders = 0
        for r in self._requests:
            if t0 <= r.at <= now:
                total += 1
                if r.role == "leader":
                    leaders += 1
        return {"requests": total, "leaders": leaders, "followers": total - leaders}

    def _active_streams(self) -> int | float:
        total = sum(v for (name, _), (v, _at) in self._gauges.items() if name == "active_streams")
        return int(total) if float(total).is_integer() else total

    def summary(self, now: float) -> dict:
        """Short state dump for the admin "show" command."""
        return {
            "capacity": self.capacity,
            "samples": {"request": len(self._requests), "upstream": len(self._upstreams), "cancel": len(self._cancels)},
            "accepted_records": self.accepted_records,
            "rejected_records": self.rejected_records,
            "last_ingest_at": self.last_ingest_at,
            "reset_at": self.reset_at,
            "gauges": [
                {"name": name, "labels": dict(labels), "value": v, "at": at, "age_s": now - at}
                for (name, labels), (v, at) in sorted(self._gauges.items())
            ],
        }

    # --- Prometheus text exposition format 0.0.4 ---------------------------------------

    def prometheus(self, now: float) -> str:
        out: list[str] = []

        def family(name: str, typ: str, help_text: str) -> None:
            out.append(f"# HELP {name} {_escape_help(help_text)}")
            out.append(f"# TYPE {name} {typ}")

        for key, (name, help_text) in _HISTOGRAMS.items():
            family(name, "histogram", help_text)
            for series, h in sorted(self._hist[key].items()):
                pm = dict(series)
                cumulative = 0
                for bound, c in zip(BUCKETS, h.counts):
                    cumulative += c
                    out.append(f"{name}_bucket{_labelset({**pm, 'le': _fmt(bound)})} {cumulative}")
                out.append(f"{name}_bucket{_labelset({**pm, 'le': '+Inf'})} {h.count}")
                out.append(f"{name}_sum{_labelset(pm)} {_fmt(h.sum)}")
                out.append(f"{name}_count{_labelset(pm)} {h.count}")

        for key, (name, help_text) in _COUNTERS.items():
            family(name, "counter", help_text)
            for series, v in sorted(self._counters[key].items()):
                out.append(f"{name}{_labelset(dict(series))} {_fmt_count(v)}")
        family(
            "sluice_upstream_calls_saved_total",
            "counter",
            "Upstream calls coalescing saved: one per follower (it would have made its own call).",
        )
        for series, v in sorted(self._counters["followers"].items()):
            out.append(f"sluice_upstream_calls_saved_total{_labelset(dict(series))} {_fmt_count(v)}")

        family(
            "sluice_upstream_retries_total",
            "counter",
            "Upstream calls tried again before their first byte, by provider and reason.",
        )
        for (provider, reason), v in sorted(self._retries_total.items()):
            out.append(f"sluice_upstream_retries_total{_labelset({'provider': provider, 'reason': reason})} {v}")

        family(
            "sluice_circuit_opens_total",
            "counter",
            "Times an API key's circuit breaker opened, by account and key (#n, never the key).",
        )
        for (account, key_), v in sorted(self._circuit_opens.items()):
            out.append(f"sluice_circuit_opens_total{_labelset({'account': account, 'key': key_})} {v}")

        family(
            "sluice_fallbacks_total",
            "counter",
            "Upstream calls sent to a fallback provider, by the provider asked for and the one used.",
        )
        for (origin, target), v in sorted(self._fallbacks_total.items()):
            out.append(f"sluice_fallbacks_total{_labelset({'from': origin, 'to': target})} {v}")

        family(
            "sluice_metrics_rejected_records_total", "counter", "Measurement records the Metrics actor could not use."
        )
        out.append(f"sluice_metrics_rejected_records_total {self.rejected_records}")

        for name, help_text in (
            ("active_streams", "Upstream streams currently open."),
            ("pacer_queue_depth", "Lease requests waiting in the pacer queue."),
            ("pacer_tokens", "Tokens currently in the pacer bucket."),
            ("pacer_leases", "Leases an account's pacer has granted and not had back (calls in flight)."),
            ("pacer_paused_seconds", "Seconds an account stays paused (429 / Retry-After); 0 when not paused."),
            ("circuit_state", "Circuit breaker of an account's API key: 0 closed, 1 open, 2 half-open."),
        ):
            metric = f"sluice_{name}"
            family(metric, "gauge", help_text)
            for (gname, labels), (gauge, _at) in sorted(self._gauges.items()):
                if gname == name:
                    out.append(f"{metric}{_labelset(dict(labels))} {_fmt(gauge)}")

        return "\n".join(out) + "\n"


def _escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _labelset(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _fmt_count(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else _fmt(v)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))
