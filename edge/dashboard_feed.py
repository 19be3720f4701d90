"""The operators' live figures, sampled once a second per edge process and pushed to every
dashboard viewer over SSE (GET /api/dashboard/events; the page is edge/web.py's).

This module owns the sampler and its fan-out. While at least one viewer is connected, ONE
task per edge process asks the actors once a second: the Metrics actor for its performance
report (TTFT, queue wait, error rate, coalescing, active streams) and its alert states with
their thresholds, and each Pacer for its state (tokens, queue, leases, grants). The snapshot
goes into a ring of the last `KEEP` samples (what a new viewer sees first: the last minutes)
and onto every viewer's queue. So the actors see one round of asks per second per edge
however many dashboards are open, and none when nobody watches (docs/operations.md
"The dashboard").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from edge.bridge import BridgeError
from protocols import messages as m

log = logging.getLogger("sluice.edge.dashboard")

INTERVAL_S = 1.0
KEEP = 600  # ten minutes of one-second samples
LAST_N = 100  # the performance window the alerts use by default
ASK_TIMEOUT_S = 2.0
VIEWER_QUEUE = 30  # samples a slow viewer may lag behind before it misses some


class DashboardFeed:
    def __init__(self, edge, interval_s: float = INTERVAL_S, keep: int = KEEP):
        self.edge = edge
        self.interval_s = interval_s
        self.history: collections.deque[dict] = collections.deque(maxlen=keep)
        self.viewers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None
        self._last_grants: tuple[float, float] | None = None  # (monotonic time, grants_total)

    # --- viewers -----------------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue:
        """A queue of snapshots (None: the gateway stops); the sampler runs while any exists."""
        queue: asyncio.Queue = asyncio.Queue(VIEWER_QUEUE)
        self.viewers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.viewers.discard(queue)
        if not self.viewers and self._task is not None:
            self._task.cancel()  # nobody watches: no more asks
            self._task = None
            self._last_grants = None

    def _publish(self, item: dict | None) -> None:
        for queue in list(self.viewers):
            with contextlib.suppress(asyncio.QueueFull):  # a viewer this far behind skips a sample
                queue.put_nowait(item)

    # --- the sampler -------------------------------------------------------------------------
    async def _run(self) -> None:
        shutting_down = self.edge.shutting_down
        while not shutting_down.is_set():
            started = time.monotonic()
            try:
                snapshot = await self.sample()
            except Exception:  # a bad sample must not end the feed for every viewer
                log.exception("dashboard sample failed")
                snapshot = {"at": time.time(), "errors": ["the sample failed; see the gateway's log"]}
            self.history.append(snapshot)
            self._publish(snapshot)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.interval_s - (time.monotonic() - started))):
                    await shutting_down.wait()
        self._publish(None)

    async def sample(self) -> dict:
        """One snapshot: asks Metrics (performance, alerts) and every Pacer (state) at once."""
        edge = self.edge
        errors: list[str] = []
        try:
            directory = await edge.bridge.refresh_directory()
            pacers = sorted(role for role in directory.entries if role.startswith("pacer:"))
        except BridgeError as exc:
            return {"at": time.time(), "errors": [f"the supervisor did not answer: {exc}"]}
        if edge.records is not None:
            await edge.records.flush()  # what this edge measured so far is included
        asks = [
            edge.bridge.ask("metrics", m.QueryPerformance(LAST_N), timeout=ASK_TIMEOUT_S),
            edge.bridge.ask("metrics", m.Admin("alerts", {}), timeout=ASK_TIMEOUT_S),
            *(edge.bridge.ask(role, m.GetState(), timeout=ASK_TIMEOUT_S) for role in pacers),
        ]
        performance, alerts, *states = await asyncio.gather(*asks, return_exceptions=True)
        snapshot: dict = {"at": time.time(), "draining": edge.out_of_service()}
        if isinstance(performance, m.Performance):
            snapshot.update(_figures(performance.report))
        else:
            errors.append(f"metrics: {performance}")
        if isinstance(alerts, m.AdminResult) and alerts.ok:
            snapshot["alerts"] = _alerts(alerts.result)
        else:
            errors.append(f"alerts: {getattr(alerts, 'error', alerts)}")
        snapshot["pacers"] = {}
        grants = 0.0
        for role, state in zip(pacers, states):
            if isinstance(state, m.State):
                snapshot["pacers"][role.partition(":")[2]] = _pacer(state.state)
                grants += state.state.get("grants_total") or 0
            else:
                errors.append(f"{role}: {state}")
        snapshot["upstream_calls_per_s"] = self._rate(grants)
        if errors:
            snapshot["errors"] = errors
        return snapshot

    def _rate(self, grants: float) -> float | None:
        """Upstream calls per second since the previous sample (the Pacers' grants)."""
        now, previous = time.monotonic(), self._last_grants
        self._last_grants = (now, grants)
        if previous is None or now <= previous[0] or grants < previous[1]:
            return None
        return round((grants - previous[1]) / (now - previous[0]), 3)


def _figures(report: dict) -> dict:
    coalesce = report.get("coalesce") or {}
    leaders, followers = coalesce.get("leaders") or 0, coalesce.get("followers") or 0
    return {
        "ttft_ms": {k: (report.get("ttft_ms") or {}).get(k) for k in ("p50", "p95", "count")},
        "queue_wait_ms": {k: (report.get("queue_wait_ms") or {}).get(k) for k in ("p50", "p95", "count")},
        "error_rate": report.get("error_rate"),
        "coalesce": {
            "leaders": leaders,
            "followers": followers,
            "ratio": round(followers / leaders, 3) if leaders else None,
        },
        "active_streams": report.get("active_streams"),
        "upstream_calls": report.get("upstream_calls"),
    }


def _alerts(result: dict) -> dict:
    """Every rule with its state ("firing", "pending" or "ok"), its figure and threshold."""
    thresholds = result.get("thresholds") or {}
    active = {a["name"]: ("firing", a) for a in result.get("firing") or []}
    active.update({a["name"]: ("pending", a) for a in result.get("pending") or []})
    rules = []
    for name, key, for_key in RULES:
        state, alert = active.get(name, ("ok", {}))
        rules.append(
            {
                "name": name,
                "state": state,
                "value": alert.get("value"),
                "since": alert.get("since"),
                "threshold": thresholds.get(key),
                "threshold_key": key,
                "for_s": thresholds.get(for_key),
                "summary": alert.get("summary"),
            }
        )
    return {"rules": rules, "thresholds": thresholds}


# (rule, its threshold key, its "held for" key): actors/alerts.py's four rules
RULES = (
    ("ttft_p95_high", "ttft_p95_ms", "ttft_for_s"),
    ("error_rate_high", "error_rate", "error_for_s"),
    ("queue_wait_p95_high", "queue_wait_p95_ms", "queue_wait_for_s"),
    ("coalesce_ratio_low", "coalesce_min_ratio", "coalesce_for_s"),
)


def _pacer(state: dict) -> dict:
    settings = state.get("settings") or {}
    return {
        "tokens": state.get("tokens"),
        "queue_depth": state.get("queue_depth"),
        "in_flight": state.get("in_flight"),
        "paused_for_s": state.get("paused_for_s"),
        "settings": {k: settings.get(k) for k in ("rps", "burst", "concurrency", "rpm", "max_queue", "max_wait_s")},
    }
