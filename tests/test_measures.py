"""edge/measures.py, driven directly: what the edge measures of one client's request, how a
terminal event maps to an outcome, and the request record; and the simulator's edge
(sim/harness.py SimEdge), which records with the same code (issue 12: sim/ holds no copy)."""

from __future__ import annotations

import pytest

from edge.measures import DISCONNECTED, Measures, outcome_of, rejected, request_record
from protocols import events as ev
from protocols import messages as m
from sim.harness import Simulation

pytestmark = pytest.mark.unit


def test_a_terminal_event_maps_to_done_cancelled_or_error_with_its_code():
    assert outcome_of(ev.done("stop")) == {"outcome": "done", "error_code": None}
    assert outcome_of(ev.error("cancelled", "bye")) == {"outcome": "cancelled", "error_code": "cancelled"}
    assert outcome_of(ev.error("upstream_5xx", "no")) == {"outcome": "error", "error_code": "upstream_5xx"}
    assert DISCONNECTED == {"outcome": "cancelled", "error_code": "disconnected"}
    assert rejected("pacer_queue_full", "simulated", "sim-1") == {
        "outcome": "rejected",
        "error_code": "pacer_queue_full",
        "provider": "simulated",
        "model": "sim-1",
    }


def test_ttft_is_the_edge_clock_until_the_started_event_reaches_the_client():
    measures = Measures(received_at=100.0)
    # the Pool's first-byte stamp (another clock) is not the client's TTFT
    started = ev.started(100.05, 7.0, provider_ttft_ms=30.0, provider="openai", model="fb-1", attempts=2)
    measures.started(started, now=100.25, leader=True)
    assert (measures.ttft_ms, measures.first_byte_at, measures.queue_wait_ms) == (250.0, 100.25, 7.0)
    assert (measures.provider_ttft_ms, measures.attempts) == (30.0, 2)
    assert measures.served == {"provider": "openai", "model": "fb-1"}
    measures.started(started, now=109.0, leader=True)  # a resumed client's replay: measured once
    assert measures.ttft_ms == 250.0
    outcome = measures.terminal(ev.done("stop", {"prompt_tokens": 3, "completion_tokens": 4}))
    assert outcome == {"outcome": "done", "error_code": None}
    assert measures.ending == {"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "finish_reason": "stop"}
    # who answered labels the outcome (a fallback), not the requested provider and model
    assert measures.ended(outcome, "simulated", "sim-1") == {
        "outcome": "done",
        "error_code": None,
        "ttft_ms": 250.0,
        "queue_wait_ms": 7.0,
        "provider_ttft_ms": 30.0,
        "provider": "openai",
        "model": "fb-1",
    }


def test_a_follower_does_not_take_the_providers_ttft():
    measures = Measures(received_at=0.0)
    measures.started(ev.started(0.0, 0.0, provider_ttft_ms=30.0), now=0.5, leader=False)
    assert measures.ttft_ms == 500.0 and measures.provider_ttft_ms is None
    assert measures.ended(DISCONNECTED, "simulated", "sim-1")["provider"] == "simulated"


def test_the_request_record_carries_the_outcome_its_measures_and_the_latency():
    outcome = {**rejected("queue_full", "simulated", "sim-1")}
    record = request_record("r1", "leader", 10.0, outcome, 10.5, key_id="k")
    assert record == {
        "kind": "request",
        "request_id": "r1",
        "role": "leader",
        "outcome": "rejected",
        "error_code": "queue_full",
        "ttft_ms": None,
        "queue_wait_ms": None,
        "latency_ms": 500.0,
        "at": 10.5,
        "key_id": "k",
        "provider": "simulated",
        "model": "sim-1",
        "provider_ttft_ms": None,
    }


def test_the_simulated_edge_records_each_request_as_the_edge_does():
    sim = Simulation(seed=3, metrics=True, latency_ms=(1.0, 1.0))
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=5)
    leader = sim.client(at=0.0, text="a")
    follower = sim.client(at=0.3, text="a")  # joins after the first byte: waits for the replay only
    gone = sim.client(at=0.0, text="b", disconnect_at=0.1)
    sim.run()
    records = {r["request_id"]: r for d in sim.messages(m.Records, src="edge:e1") for r in d.msg.records}
    assert set(records) == {leader.request_id, follower.request_id, gone.request_id}
    assert records[leader.request_id]["outcome"] == "done" and records[leader.request_id]["role"] == "leader"
    # the TTFT on the edge's clock: from arrival until the started event reached the client
    started_at = leader.measures.first_byte_at
    assert started_at is not None and started_at > 0.2  # the upstream's TTFT plus the hops
    assert records[leader.request_id]["ttft_ms"] == round(started_at * 1000.0, 3)
    assert records[follower.request_id]["role"] == "follower"
    assert records[follower.request_id]["ttft_ms"] < 50.0 and records[follower.request_id]["provider_ttft_ms"] is None
    assert (records[gone.request_id]["outcome"], records[gone.request_id]["error_code"]) == (
        "cancelled",
        "disconnected",
    )
    assert records[leader.request_id]["provider"] == "simulated"
