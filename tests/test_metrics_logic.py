"""Unit tests for actors/metrics_logic.py: records in, percentiles and Prometheus text out."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics_logic import BUCKETS, MetricsLogic, nearest_rank

pytestmark = pytest.mark.unit

NOW = 1_000_000.0


def req(i=0, *, role="leader", outcome="done", ttft=100.0, qw=0.0, lat=500.0, at=None, error_code=None):
    return {
        "kind": "request",
        "request_id": f"r{i}",
        "role": role,
        "outcome": outcome,
        "error_code": error_code,
        "ttft_ms": ttft,
        "queue_wait_ms": qw,
        "latency_ms": lat,
        "at": NOW + i if at is None else at,
    }


def up(i=0, *, provider="sim", outcome="done", at=None):
    return {
        "kind": "upstream",
        "stream_id": f"s{i}",
        "provider": provider,
        "outcome": outcome,
        "error_code": None,
        "upstream_ttft_ms": 80.0,
        "latency_ms": 400.0,
        "at": NOW + i if at is None else at,
    }


def cancel(i=0, ms=50.0, at=None):
    return {"kind": "cancel", "stream_id": f"s{i}", "cancel_ms": ms, "at": NOW + i if at is None else at}


def gauge(name, value, labels=None, at=NOW):
    return {"kind": "gauge", "name": name, "labels": labels or {}, "value": value, "at": at}


# --- percentiles ---------------------------------------------------------------------


def test_nearest_rank_1_to_100():
    s = [float(x) for x in range(1, 101)]
    assert nearest_rank(s, 50) == 50
    assert nearest_rank(s, 95) == 95
    assert nearest_rank(s, 99) == 99


def test_nearest_rank_small_samples():
    assert nearest_rank([], 50) is None
    assert nearest_rank([7.0], 99) == 7.0
    # n=10: ranks ceil(5)=5, ceil(9.5)=10, ceil(9.9)=10
    s = [float(x) for x in range(1, 11)]
    assert (nearest_rank(s, 50), nearest_rank(s, 95), nearest_rank(s, 99)) == (5, 10, 10)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200), st.sampled_from([50, 95, 99]))
@settings(max_examples=200, deadline=None)
def test_nearest_rank_definition(samples, p):
    s = sorted(samples)
    v = nearest_rank(s, p)
    # at least p % of samples are <= v, and fewer than p % are strictly below it
    assert sum(1 for x in s if x <= v) * 100 >= p * len(s)
    assert sum(1 for x in s if x < v) * 100 < p * len(s)


def test_performance_percentiles_from_records():
    m = MetricsLogic()
    # shuffled arrival order must not matter
    order = list(range(1, 101))
    order = order[::2] + order[1::2]
    m.ingest([req(i, ttft=float(i), qw=float(i) * 2, lat=float(i) * 10) for i in order], NOW)
    p = m.performance(100, NOW)
    assert p["ttft_ms"] == {"p50": 50, "p95": 95, "p99": 99, "count": 100}
    assert p["queue_wait_ms"] == {"p50": 100, "p95": 190, "p99": 198, "count": 100}
    assert p["latency_ms"]["p95"] == 950


# --- performance report shape and definitions -----------------------------------------


def test_exact_key_set_and_empty_window():
    p = MetricsLogic().performance(100, NOW)
    # the sign-off's shape, and the optional provider breakdown (issue 18)
    assert set(p) == {
        "ttft_ms",
        "queue_wait_ms",
        "latency_ms",
        "cancel_ms",
        "error_rate",
        "coalesce",
        "upstream_calls",
        "active_streams",
        "window",
        "provider_ttft_ms",
        "added_ttft_ms",
        "by_provider",
    }
    assert p["by_provider"] == []
    for k in ("ttft_ms", "queue_wait_ms", "latency_ms", "cancel_ms", "provider_ttft_ms", "added_ttft_ms"):
        assert p[k] == {"p50": None, "p95": None, "p99": None, "count": 0}
    assert p["error_rate"] == 0.0
    assert p["coalesce"] == {"leaders": 0, "followers": 0}
    assert p["upstream_calls"] == 0
    assert p["active_streams"] == 0
    assert p["window"] == {"last_n": 100, "from": None, "to": None}


def test_none_samples_are_skipped():
    m = MetricsLogic()
    # requests that never got a first token (rejected, cancelled while queued)
    m.ingest(
        [
            req(0, ttft=None, qw=None, outcome="rejected"),
            req(1, ttft=None, qw=None, outcome="cancelled"),
            req(2, ttft=300.0, qw=10.0),
        ],
        NOW,
    )
    p = m.performance(100, NOW)
    assert p["ttft_ms"] == {"p50": 300.0, "p95": 300.0, "p99": 300.0, "count": 1}
    assert p["queue_wait_ms"]["count"] == 1
    assert p["latency_ms"]["count"] == 3


def test_error_rate_counts_error_and_rejected_not_cancelled():
    m = MetricsLogic()
    outcomes = ["done"] * 6 + ["cancelled"] * 2 + ["error", "rejected"]
    m.ingest([req(i, outcome=o) for i, o in enumerate(outcomes)], NOW)
    assert m.performance(100, NOW)["error_rate"] == pytest.approx(0.2)
    m2 = MetricsLogic()
    m2.ingest([req(i, outcome="cancelled") for i in range(5)], NOW)
    assert m2.performance(100, NOW)["error_rate"] == 0.0


def test_coalesce_and_upstream_calls_and_window():
    m = MetricsLogic()
    # 1 leader + 49 followers at t=NOW..NOW+49; upstream calls inside and outside the span
    m.ingest([req(0, role="leader")] + [req(i, role="follower") for i in range(1, 50)], NOW)
    m.ingest([up(0, at=NOW - 5), up(1, at=NOW), up(2, at=NOW + 49), up(3, at=NOW + 50)], NOW)
    p = m.performance(100, NOW + 60)
    assert p["coalesce"] == {"leaders": 1, "followers": 49}
    assert p["window"] == {"last_n": 100, "from": NOW, "to": NOW + 49}
    assert p["upstream_calls"] == 2  # only those with `at` in [from, to]


def test_last_n_windowing_uses_arrival_order():
    m = MetricsLogic()
    m.ingest([req(i, ttft=1000.0, outcome="error") for i in range(50)], NOW)
    m.ingest([req(100 + i, ttft=10.0) for i in range(10)], NOW)
    p = m.performance(10, NOW)
    assert p["ttft_ms"]["p99"] == 10.0
    assert p["error_rate"] == 0.0
    assert p["window"]["last_n"] == 10
    assert m.performance(20, NOW)["error_rate"] == 0.5


def test_cancel_window_is_its_own():
    m = MetricsLogic()
    m.ingest([cancel(i, ms=float(i)) for i in range(1, 201)], NOW)
    p = m.performance(100, NOW)  # last 100 cancels: 101..200
    assert p["cancel_ms"] == {"p50": 150.0, "p95": 195.0, "p99": 199.0, "count": 100}


def test_last_n_is_clamped():
    m = MetricsLogic(capacity=10)
    m.ingest([req(i) for i in range(5)], NOW)
    assert m.performance(0, NOW)["window"]["last_n"] == 1
    assert m.performance(-3, NOW)["latency_ms"]["count"] == 1
    assert m.performance(10**9, NOW)["window"]["last_n"] == 10
    assert m.performance("junk", NOW)["window"]["last_n"] == 1


def test_ring_capacity_bounds_memory():
    m = MetricsLogic(capacity=10)
    m.ingest([req(i, ttft=float(i)) for i in range(25)], NOW)
    m.ingest([up(i) for i in range(25)] + [cancel(i) for i in range(25)], NOW)
    s = m.summary(NOW)
    assert s["samples"] == {"request": 10, "upstream": 10, "cancel": 10}
    p = m.performance(1000, NOW)
    assert p["ttft_ms"]["count"] == 10
    assert p["ttft_ms"]["p50"] == 19.0  # the oldest kept is 15
    # cumulative counters are not bounded by the ring
    fam = _families(m)
    assert _sample(fam, "sluice_requests", "sluice_requests_total", outcome="done", role="leader") == 25


def test_active_streams_gauge_latest_wins_and_sums():
    m = MetricsLogic()
    m.ingest(
        [
            gauge("active_streams", 3, {"pool": "a"}, at=NOW),
            gauge("active_streams", 5, {"pool": "a"}, at=NOW + 1),
            gauge("active_streams", 2, {"pool": "a"}, at=NOW - 1),  # late delivery: ignored
            gauge("active_streams", 4, {"pool": "b"}, at=NOW),
        ],
        NOW,
    )
    assert m.performance(100, NOW)["active_streams"] == 9
    assert isinstance(m.performance(100, NOW)["active_streams"], int)


def test_reset_clears_window_not_counters():
    m = MetricsLogic()
    m.ingest([req(i, outcome="error") for i in range(5)] + [cancel(0), up(0), gauge("active_streams", 2)], NOW)
    m.reset(NOW + 1)
    p = m.performance(100, NOW + 1)
    assert p["latency_ms"]["count"] == 0 and p["cancel_ms"]["count"] == 0
    assert p["error_rate"] == 0.0 and p["upstream_calls"] == 0
    assert p["active_streams"] == 2  # gauges are current state, kept
    assert m.summary(NOW + 1)["reset_at"] == NOW + 1
    fam = _families(m)
    assert _sample(fam, "sluice_requests", "sluice_requests_total", outcome="error", role="leader") == 5
    assert _sample(fam, "sluice_request_duration_seconds", "sluice_request_duration_seconds_count") == 5


# --- malformed input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        "request",
        [],
        {},
        {"kind": "nope"},
        {**req(), "role": "boss"},
        {**req(), "outcome": "timeout"},
        {**req(), "latency_ms": None},
        {**req(), "latency_ms": -1.0},
        {**req(), "latency_ms": float("nan")},
        {**req(), "ttft_ms": float("inf")},
        {**req(), "ttft_ms": "12"},
        {**req(), "ttft_ms": True},
        {**req(), "error_code": 5},
        {k: v for k, v in req().items() if k != "at"},
        {k: v for k, v in req().items() if k != "request_id"},
        {**up(), "outcome": "rejected"},  # not an upstream outcome
        {**up(), "provider": None},
        {**cancel(), "cancel_ms": -5},
        {k: v for k, v in cancel().items() if k != "stream_id"},
        gauge("made_up", 1),
        gauge("pacer_tokens", "1"),
        gauge("pacer_tokens", 1, {"bad-name": "x"}),
        gauge("pacer_tokens", 1, {"provider": 3}),
        {**gauge("pacer_tokens", 1), "labels": ["provider"]},
    ],
)
def test_malformed_records_are_counted_and_skipped(bad):
    m = MetricsLogic()
    m.ingest([bad, req(1)], NOW)  # the good record after it still lands
    assert m.rejected_records == 1
    assert m.performance(100, NOW)["latency_ms"]["count"] == 1
    assert m.summary(NOW)["rejected_records"] == 1
    # a rejected record leaves no trace in counters or histograms
    fam = _families(m)
    assert _sample(fam, "sluice_request_duration_seconds", "sluice_request_duration_seconds_count") == 1
    assert _sample(fam, "sluice_metrics_rejected_records", "sluice_metrics_rejected_records_total") == 1


def test_batch_that_is_not_a_list_is_rejected():
    m = MetricsLogic()
    m.ingest(None, NOW)
    m.ingest({"kind": "request"}, NOW)
    assert m.rejected_records == 2


def test_extra_fields_and_int_values_accepted():
    m = MetricsLogic()
    m.ingest([{**req(), "ttft_ms": 120, "latency_ms": 900, "at": int(NOW), "future_field": [1, 2]}], NOW)
    assert m.rejected_records == 0
    assert m.performance(1, NOW)["ttft_ms"]["p50"] == 120.0


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(),
            st.dictionaries(
                st.sampled_from(
                    [
                        "kind",
                        "role",
                        "outcome",
                        "at",
                        "latency_ms",
                        "request_id",
                        "name",
                        "labels",
                        "value",
                        "cancel_ms",
                        "stream_id",
                        "provider",
                        "ttft_ms",
                        "queue_wait_ms",
                        "error_code",
                    ]
                ),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.floats(),
                    st.integers(),
                    st.text(max_size=5),
                    st.sampled_from(["request", "upstream", "cancel", "gauge", "leader", "done", "pacer_tokens"]),
                    st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
                ),
            ),
        ),
        max_size=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_ingest_never_raises(batch):
    m = MetricsLogic(capacity=50)
    m.ingest(batch, NOW)
    assert m.rejected_records + m.accepted_records == len(batch)
    m.performance(100, NOW)
    m.summary(NOW)
    list(text_string_to_metric_families(m.prometheus(NOW)))


def test_cardinality_cap_on_gauges():
    from actors import metrics_logic

    m = MetricsLogic()
    n = metrics_logic.MAX_GAUGE_SERIES
    m.ingest([gauge("pacer_tokens", 1, {"provider": f"p{i}"}) for i in range(n + 5)], NOW)
    assert m.rejected_records == 5
    assert len(m.summary(NOW)["gauges"]) == n


def test_summary_shape():
    m = MetricsLogic(capacity=7)
    m.ingest([req(0), gauge("pacer_queue_depth", 3, {"provider": "sim"}, at=NOW - 2), 5], NOW)
    s = m.summary(NOW)
    assert s["capacity"] == 7
    assert s["samples"] == {"request": 1, "upstream": 0, "cancel": 0}
    assert s["rejected_records"] == 1
    assert s["last_ingest_at"] == NOW
    assert s["gauges"] == [
        {"name": "pacer_queue_depth", "labels": {"provider": "sim"}, "value": 3.0, "at": NOW - 2, "age_s": 2.0}
    ]


# --- Prometheus exposition ---------------------------------------------------------------


def _families(m: MetricsLogic) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.prometheus(NOW))}


def _sample(fams, family, name, **labels):
    """The one sample of `name` whose labels include `labels` (records without provider
    or model are labelled provider="unknown", model="unknown")."""
    hits = [s.value for s in fams[family].samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(hits) == 1, (family, name, labels, fams[family].samples)
    return hits[0]


def _loaded() -> MetricsLogic:
    m = MetricsLogic()
    recs = [
        req(
            i,
            role="leader" if i % 10 == 0 else "follower",
            ttft=float(i * 37 % 3000),
            qw=float(i % 7) * 200,
            lat=float(i * 311 % 200_000),
            outcome=["done", "error", "cancelled", "rejected"][i % 4],
        )
        for i in range(200)
    ]
    recs += [req(999, ttft=1500.0, qw=1000.0, lat=1500.0)]  # exactly on bucket bounds
    recs += [
        up(i, provider=["sim", 'we"ird\\prov\nider'][i % 2], outcome=["done", "error"][i % 2 == 0 and i % 3 == 0])
        for i in range(20)
    ]
    recs += [cancel(i, ms=float(i * 13)) for i in range(40)]
    recs += [
        gauge("active_streams", 4),
        gauge("pacer_queue_depth", 2, {"provider": "sim"}),
        gauge("pacer_tokens", 1.5, {"provider": "sim"}),
        gauge("pacer_tokens", 0, {"provider": 'we"ird\\prov\nider'}),
    ]
    m.ingest(recs, NOW)
    return m


def test_prometheus_families_and_types():
    fams = _families(_loaded())
    expected = {
        "sluice_ttft_seconds": "histogram",
        "sluice_provider_ttft_seconds": "histogram",
        "sluice_added_ttft_seconds": "histogram",
        "sluice_queue_wait_seconds": "histogram",
        "sluice_cancel_latency_seconds": "histogram",
        "sluice_request_duration_seconds": "histogram",
        # the parser strips _total from counter family names
        "sluice_requests": "counter",
        "sluice_upstream_calls": "counter",
        "sluice_request_errors": "counter",
        "sluice_upstream_errors": "counter",
        "sluice_upstream_tokens": "counter",
        "sluice_upstream_calls_saved": "counter",
        "sluice_upstream_retries": "counter",
        "sluice_circuit_opens": "counter",
        "sluice_fallbacks": "counter",
        "sluice_coalesce_leaders": "counter",
        "sluice_coalesce_followers": "counter",
        "sluice_metrics_rejected_records": "counter",
        "sluice_active_streams": "gauge",
        "sluice_pacer_queue_depth": "gauge",
        "sluice_pacer_tokens": "gauge",
        "sluice_pacer_leases": "gauge",
        "sluice_pacer_paused_seconds": "gauge",
        "sluice_circuit_state": "gauge",
    }
    assert {k: f.type for k, f in fams.items()} == expected
    for f in fams.values():
        assert f.documentation  # HELP present


def test_prometheus_text_has_help_and_type_lines():
    text = _loaded().prometheus(NOW)
    assert text.endswith("\n")
    assert "# TYPE sluice_requests_total counter" in text
    assert "# HELP sluice_ttft_seconds " in text
    assert "# TYPE sluice_ttft_seconds histogram" in text


@pytest.mark.parametrize(
    "name",
    [
        "sluice_ttft_seconds",
        "sluice_queue_wait_seconds",
        "sluice_cancel_latency_seconds",
        "sluice_request_duration_seconds",
    ],
)
def test_histogram_buckets_monotonic_and_inf_equals_count(name):
    fams = _families(_loaded())
    samples = fams[name].samples
    buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name == name + "_bucket"]
    assert [b for b, _ in buckets] == list(BUCKETS) + [math.inf]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    count = [s.value for s in samples if s.name == name + "_count"][0]
    assert buckets[-1] == (math.inf, count)
    assert count > 0
    total = [s.value for s in samples if s.name == name + "_sum"][0]
    assert total >= 0


def test_histogram_values_match_samples():
    m = MetricsLogic()
    m.ingest([req(0, ttft=1500.0), req(1, ttft=1500.001), req(2, ttft=200_000.0), req(3, ttft=None)], NOW)
    fams = _families(m)
    b = {float(s.labels["le"]): s.value for s in fams["sluice_ttft_seconds"].samples if s.name.endswith("_bucket")}
    assert b[1.0] == 0
    assert b[1.5] == 1  # le is inclusive: exactly 1.5 s lands in le="1.5"
    assert b[2.5] == 2
    assert b[120.0] == 2
    assert b[math.inf] == 3
    assert _sample(fams, "sluice_ttft_seconds", "sluice_ttft_seconds_sum") == pytest.approx(1.5 + 1.500001 + 200.0)


def test_prometheus_counters_and_gauges():
    m = _loaded()
    fams = _families(m)
    # all outcome x role combinations exist from the start so rate() works
    assert len(fams["sluice_requests"].samples) == 8
    total = sum(s.value for s in fams["sluice_requests"].samples)
    assert total == 201
    leaders = _sample(fams, "sluice_coalesce_leaders", "sluice_coalesce_leaders_total")
    followers = _sample(fams, "sluice_coalesce_followers", "sluice_coalesce_followers_total")
    assert (leaders, followers) == (21, 180)
    # label value with quote, backslash and newline survives escaping
    weird = 'we"ird\\prov\nider'
    assert _sample(fams, "sluice_pacer_tokens", "sluice_pacer_tokens", provider=weird) == 0
    assert _sample(fams, "sluice_pacer_tokens", "sluice_pacer_tokens", provider="sim") == 1.5
    assert _sample(fams, "sluice_pacer_queue_depth", "sluice_pacer_queue_depth", provider="sim") == 2
    assert _sample(fams, "sluice_active_streams", "sluice_active_streams") == 4
    up_total = sum(s.value for s in fams["sluice_upstream_calls"].samples)
    assert up_total == 20
    assert {s.labels["provider"] for s in fams["sluice_upstream_calls"].samples} == {"sim", weird}


def test_prometheus_empty_is_parseable():
    fams = _families(MetricsLogic())
    # a labelled histogram has no series until its first (provider, model) shows up
    assert fams["sluice_ttft_seconds"].samples == []
    assert fams["sluice_active_streams"].samples == []


def test_upstream_calls_count_a_call_that_ended_before_its_clients():
    # One call 10.0 -> 10.4; its two clients arrived at 10.0 and ended at 10.45 and 10.5.
    metrics = MetricsLogic()
    metrics.ingest([up(0, at=10.4)], now=10.4)
    metrics.ingest([req(0, lat=450.0, at=10.45), req(1, role="follower", lat=500.0, at=10.5)], now=10.5)
    assert metrics.performance(100, now=11.0)["upstream_calls"] == 1
    metrics.ingest([up(1, at=5.0)], now=11.0)  # long before this window's clients arrived
    assert metrics.performance(100, now=11.0)["upstream_calls"] == 1


def test_retry_records_are_counted_by_provider_and_reason():
    m = MetricsLogic()
    rec = {"kind": "retry", "provider": "simulated", "reason": "429", "attempt": 2, "at": NOW}
    m.ingest([rec, rec, {**rec, "reason": "reset"}, {**rec, "reason": "flaky"}], NOW)
    text = m.prometheus(NOW)
    assert 'sluice_upstream_retries_total{provider="simulated",reason="429"} 2' in text
    assert 'sluice_upstream_retries_total{provider="simulated",reason="reset"} 1' in text
    assert m.rejected_records == 1  # a reason outside the list would grow the label set


# --- provider / model labels, tokens, added TTFT (issue 18) ---------------------------------


def test_every_family_is_labelled_by_provider_and_model():
    m = MetricsLogic()
    m.ingest(
        [
            {
                **req(0, ttft=300.0),
                "provider": "openai",
                "model": "gpt-x",
                "provider_ttft_ms": 250.0,
                "key_id": "team-a",
            },
            {
                **req(1, role="follower", outcome="error", error_code="upstream_error"),
                "provider": "openai",
                "model": "gpt-y",
                "key_id": "team-a",
            },
            {**up(0, provider="openai"), "model": "gpt-x", "input_tokens": 12, "output_tokens": 30},
            {
                **up(1, provider="openai", outcome="error"),
                "model": "gpt-x",
                "error_code": "upstream_5xx",
                "input_tokens": None,
                "output_tokens": None,
            },
            {**cancel(0), "provider": "openai", "model": "gpt-x"},
        ],
        NOW,
    )
    assert m.rejected_records == 0
    fams = _families(m)
    for name in (
        "sluice_ttft_seconds",
        "sluice_provider_ttft_seconds",
        "sluice_added_ttft_seconds",
        "sluice_queue_wait_seconds",
        "sluice_cancel_latency_seconds",
        "sluice_request_duration_seconds",
        "sluice_requests",
        "sluice_request_errors",
        "sluice_upstream_calls",
        "sluice_upstream_errors",
        "sluice_upstream_tokens",
        "sluice_coalesce_leaders",
        "sluice_coalesce_followers",
        "sluice_upstream_calls_saved",
    ):
        assert fams[name].samples, name
        for s in fams[name].samples:
            assert s.labels["provider"] == "openai" and s.labels["model"] in ("gpt-x", "gpt-y"), (name, s)
    assert _sample(fams, "sluice_requests", "sluice_requests_total", model="gpt-x", outcome="done", role="leader") == 1
    assert all(s.labels["key_id"] == "team-a" for s in fams["sluice_requests"].samples)
    assert (
        _sample(
            fams, "sluice_request_errors", "sluice_request_errors_total", model="gpt-y", error_type="upstream_error"
        )
        == 1
    )
    assert (
        _sample(
            fams, "sluice_upstream_errors", "sluice_upstream_errors_total", model="gpt-x", error_type="upstream_5xx"
        )
        == 1
    )
    assert _sample(fams, "sluice_upstream_tokens", "sluice_upstream_tokens_total", token_type="input") == 12
    assert _sample(fams, "sluice_upstream_tokens", "sluice_upstream_tokens_total", token_type="output") == 30
    assert _sample(fams, "sluice_upstream_calls_saved", "sluice_upstream_calls_saved_total", model="gpt-y") == 1
    # added = client - provider, observed in seconds
    assert _sample(fams, "sluice_added_ttft_seconds", "sluice_added_ttft_seconds_sum", model="gpt-x") == pytest.approx(
        0.05
    )
    assert _sample(
        fams, "sluice_provider_ttft_seconds", "sluice_provider_ttft_seconds_sum", model="gpt-x"
    ) == pytest.approx(0.25)


def test_open_access_has_no_key_id_label():
    m = MetricsLogic()
    m.ingest([{**req(0), "provider": "sim", "model": "a", "key_id": None}], NOW)
    assert all("key_id" not in s.labels for s in _families(m)["sluice_requests"].samples)


def test_added_ttft_in_performance_and_breakdown():
    m = MetricsLogic()
    m.ingest(
        [
            {**req(0, ttft=300.0), "provider": "sim", "model": "a", "provider_ttft_ms": 200.0},
            {**req(1, ttft=500.0), "provider": "sim", "model": "b", "provider_ttft_ms": 100.0},
            {**req(2, ttft=50.0, role="follower"), "provider": "sim", "model": "b"},
        ],
        NOW,
    )
    p = m.performance(100, NOW)
    assert p["added_ttft_ms"]["count"] == 2 and p["added_ttft_ms"]["p99"] == 400.0
    assert p["provider_ttft_ms"]["p50"] == 100.0
    by = {(g["provider"], g["model"]): g for g in p["by_provider"]}
    assert set(by) == {("sim", "a"), ("sim", "b")}
    assert by[("sim", "a")]["added_ttft_ms"]["p50"] == 100.0
    assert by[("sim", "b")]["requests"] == 2 and by[("sim", "b")]["ttft_ms"]["count"] == 2
    # a provider TTFT above the client's (clock noise) adds 0, never a negative
    m.ingest([{**req(3, ttft=10.0), "provider": "sim", "model": "a", "provider_ttft_ms": 11.0}], NOW)
    assert m.performance(1, NOW)["added_ttft_ms"]["p50"] == 0.0


def test_label_cardinality_stays_bounded_under_1000_models():
    from actors.metrics_logic import MAX_MODELS_PER_PROVIDER, OTHER

    m = MetricsLogic()
    recs = []
    for i in range(1000):
        recs.append({**req(i), "provider": "sim", "model": f"model-{i}", "provider_ttft_ms": 50.0})
        recs.append({**up(i), "model": f"model-{i}", "input_tokens": 1, "output_tokens": 2})
    m.ingest(recs, NOW)
    assert m.rejected_records == 0  # folded, not dropped
    fams = _families(m)
    for name in ("sluice_requests", "sluice_ttft_seconds", "sluice_upstream_tokens", "sluice_upstream_calls"):
        models = {s.labels["model"] for s in fams[name].samples}
        assert len(models) == MAX_MODELS_PER_PROVIDER + 1 and OTHER in models, name
    assert sum(s.value for s in fams["sluice_requests"].samples) == 1000  # every request still counts
    assert _sample(
        fams, "sluice_upstream_tokens", "sluice_upstream_tokens_total", model=OTHER, token_type="output"
    ) == 2 * (1000 - MAX_MODELS_PER_PROVIDER)
    assert len(m.prometheus(NOW).splitlines()) < 6000


@pytest.mark.parametrize(
    "bad",
    [
        {**req(), "provider": 5},
        {**req(), "model": ["m"]},
        {**req(), "key_id": 1},
        {**req(), "provider_ttft_ms": -1.0},
        {**up(), "input_tokens": -3},
        {**up(), "output_tokens": 1.5},
        {**cancel(), "model": 3},
    ],
)
def test_malformed_label_and_token_fields_are_rejected(bad):
    m = MetricsLogic()
    m.ingest([bad], NOW)
    assert m.rejected_records == 1
