"""Alert rules of the phase-1 sign-off sheet, evaluated inside the Metrics actor.

This module owns the four built-in rules, their thresholds, and their state machines.
It reads figures from a `MetricsLogic` (actors/metrics_logic.py), does no I/O and reads
no clock: the host passes `now` (wall-clock seconds) to every call and logs one line per
transition that `evaluate` returns. docs/prometheus-alerts.yml has the same rules for an
external Prometheus.

Rules (defaults in brackets; every threshold is a key of the `thresholds` dict):

  ttft_p95_high        performance(perf_window [100]).ttft_ms.p95 > ttft_p95_ms [1500]
                       held for ttft_for_s [300] seconds
  error_rate_high      performance(error_window [100]).error_rate > error_rate [0.01]
                       held for error_for_s [0] seconds (fires at once)
  queue_wait_p95_high  performance(perf_window [100]).queue_wait_ms.p95
                       > queue_wait_p95_ms [1000] held for queue_wait_for_s [300] seconds
  coalesce_ratio_low   followers / leaders < coalesce_min_ratio [10] during a burst,
                       held for coalesce_for_s [0] seconds

A *burst* is: at least burst_min_requests [50] request records whose `at` lies in the
last burst_window_s [10] seconds (now - W <= at <= now), of which at least one is a
leader (a leader is what makes coalescing possible: followers can only join one). The
ratio is followers / leaders over exactly those requests. Outside a burst the rule's
condition is false, so a firing alert resolves once the burst has left the window.
Known limitation: request records do not carry the coalescing key, so a burst of
*distinct* prompts (where no coalescing is possible) also counts as a burst and shows a
low ratio. Raise burst_min_requests, or add a key hash to request records, if that
gives false alarms.

A rule whose figure is missing (no samples: p95 is None) is not true.

State machine per rule, Prometheus "for" semantics:

  inactive --condition true--> pending (since = now)
  pending  --condition held for >= for_s (now - since >= for_s)--> firing
  pending  --condition false--> inactive   (transition event "cleared")
  firing   --condition false--> inactive   (transition event "resolved")

With for_s == 0 a rule goes inactive -> firing in one evaluation (one transition, event
"firing"), as Prometheus does. The condition is only sampled when `evaluate` runs, so a
condition that flickers off between two evaluations is not seen.

A transition is a dict: {"name", "from", "to", "event", "at", "since", "value",
"threshold", "summary"}; `event` is "pending" | "firing" | "resolved" | "cleared".
`alerts(now)` lists {"name", "since", "value", "threshold", "summary"} for firing and
pending rules; `since` is when the condition became true (Prometheus' activeAt).
"""

from __future__ import annotations

from protocols.settings import ALERT_DEFAULTS as DEFAULTS
from protocols.settings import validate_thresholds

RULE_NAMES = ("ttft_p95_high", "error_rate_high", "queue_wait_p95_high", "coalesce_ratio_low")


class _RuleState:
    __slots__ = ("state", "since", "value", "threshold", "summary")

    def __init__(self) -> None:
        self.state = "inactive"
        self.since: float | None = None
        self.value = None
        self.threshold = None
        self.summary = ""


class AlertEvaluator:
    """Holds thresholds and per-rule state; see the module docstring for semantics."""

    def __init__(self, thresholds: dict | None = None) -> None:
        self.thresholds = dict(DEFAULTS)
        self.thresholds.update(validate_thresholds(thresholds))
        self._state = {name: _RuleState() for name in RULE_NAMES}

    def configure(self, thresholds: dict) -> dict:
        """Change some thresholds at run time (admin command). Validates everything
        before changing anything; rule states are kept, so a pending rule keeps its
        `since`. Returns the full threshold set."""
        self.thresholds.update(validate_thresholds(thresholds))
        return dict(self.thresholds)

    # --- conditions: each returns (condition true?, value, threshold, summary) ----------

    def _conditions(self, metrics, now: float) -> dict:
        t = self.thresholds
        perf = metrics.performance(t["perf_window"], now)
        if t["error_window"] == t["perf_window"]:
            err_perf = perf
        else:
            err_perf = metrics.performance(t["error_window"], now)
        out = {}

        p95 = perf["ttft_ms"]["p95"]
        out["ttft_p95_high"] = (
            p95 is not None and p95 > t["ttft_p95_ms"],
            p95,
            t["ttft_p95_ms"],
            f"TTFT p95 {_ms(p95)} over the last {t['perf_window']} requests "
            f"(threshold {_ms(t['ttft_p95_ms'])}, for {t['ttft_for_s']:g} s)",
        )

        rate = err_perf["error_rate"]
        out["error_rate_high"] = (
            rate > t["error_rate"],
            rate,
            t["error_rate"],
            f"error rate {rate:.2%} over the last {t['error_window']} requests (threshold {t['error_rate']:.2%})",
        )

        qw = perf["queue_wait_ms"]["p95"]
        out["queue_wait_p95_high"] = (
            qw is not None and qw > t["queue_wait_p95_ms"],
            qw,
            t["queue_wait_p95_ms"],
            f"queue wait p95 {_ms(qw)} over the last {t['perf_window']} requests "
            f"(threshold {_ms(t['queue_wait_p95_ms'])}, for {t['queue_wait_for_s']:g} s)",
        )

        burst = metrics.burst_stats(t["burst_window_s"], now)
        is_burst = burst["requests"] >= t["burst_min_requests"] and burst["leaders"] >= 1
        ratio = burst["followers"] / burst["leaders"] if burst["leaders"] else None
        out["coalesce_ratio_low"] = (
            is_burst and ratio < t["coalesce_min_ratio"],
            ratio,
            t["coalesce_min_ratio"],
            f"coalesce ratio {_num(ratio)} followers/leader "
            f"({burst['followers']}/{burst['leaders']}) over {burst['requests']} requests "
            f"in the last {t['burst_window_s']:g} s (threshold {t['coalesce_min_ratio']:g}, "
            f"burst = >= {t['burst_min_requests']} requests)",
        )
        return out

    def _for_s(self, name: str) -> float:
        return self.thresholds[
            {
                "ttft_p95_high": "ttft_for_s",
                "error_rate_high": "error_for_s",
                "queue_wait_p95_high": "queue_wait_for_s",
                "coalesce_ratio_low": "coalesce_for_s",
            }[name]
        ]

    def evaluate(self, metrics, now: float) -> list[dict]:
        """Sample every rule once; return the transitions (possibly none)."""
        transitions = []
        for name, (cond, value, threshold, summary) in self._conditions(metrics, now).items():
            st = self._state[name]
            st.value, st.threshold, st.summary = value, threshold, summary
            before = st.state
            if cond:
                if before == "inactive":
                    st.state, st.since = "pending", now
                if st.state == "pending" and now - st.since >= self._for_s(name):
                    st.state = "firing"
            elif before != "inactive":
                st.state = "inactive"
            if st.state != before:
                event = st.state if st.state != "inactive" else ("resolved" if before == "firing" else "cleared")
                transitions.append(
                    {
                        "name": name,
                        "from": before,
                        "to": st.state,
                        "event": event,
                        "at": now,
                        "since": st.since,
                        "value": value,
                        "threshold": threshold,
                        "summary": summary,
                    }
                )
            if st.state == "inactive":
                st.since = None
        return transitions

    def alerts(self, now: float) -> dict:
        """Firing and pending rules as of the last `evaluate`."""
        result: dict = {"firing": [], "pending": []}
        for name in RULE_NAMES:
            st = self._state[name]
            if st.state in result:
                result[st.state].append(
                    {
                        "name": name,
                        "since": st.since,
                        "value": st.value,
                        "threshold": st.threshold,
                        "summary": st.summary,
                    }
                )
        return result


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
