"""A request the Pacer refuses as it arrives, on each path that refuses one (queue full,
every key paused past the longest wait, every circuit open): where its stream ends
(actors/pacer_logic.py `_denied_on_arrival`, `_unavailable`; docs/reliability.md, the
Pacer's death).

A request that names its hub (`LeaseRequest.hub`: a re-ask of a replaced Pacer, or a
fallback, after its flight was queued) has clients admitted and listening at that hub:
the shard rejects only those still waiting, so the Pacer ends the stream there
(`FailStream`, with the refusal's code and text). A first ask names none: nobody was
admitted, the shard rejects its clients, and nothing goes to a hub."""

from __future__ import annotations

import pytest

from actors.circuit import OPEN, CircuitSettings
from actors.pacer_logic import PacerLogic, PacerSettings
from actors.pool_choice import PoolChoice
from protocols import messages as m
from protocols.effects import Send

pytestmark = pytest.mark.unit

T0 = 1000.0
FAST = CircuitSettings(failures=3, open_s=10.0, max_open_s=40.0)


def request(lease: str, hub: str = "") -> m.LeaseRequest:
    return m.LeaseRequest(lease, "simulated", T0, "sim-1", {}, "coalescer:0", hub=hub)


def sent(effects, kind) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and isinstance(e.msg, kind)]


def pacer(**settings) -> PacerLogic:
    """One key, two Pools (the request's hub may be either, or one this Pacer never heard of)."""
    logic = PacerLogic("simulated", PacerSettings(**settings), circuit=FAST)
    logic.pools = PoolChoice(["pool", "pool:1"])
    return logic


def queue_full() -> PacerLogic:
    logic = pacer(rps=100, burst=100, concurrency=1, max_queue=1)
    assert sent(logic.handle(request("running"), "coalescer:0", T0), m.OpenStream)
    assert sent(logic.handle(request("waiting"), "coalescer:0", T0), m.LeaseQueued)
    return logic


def paused_past_the_wait() -> PacerLogic:
    logic = pacer(rps=100, burst=100, concurrency=10, max_wait_s=30)
    logic.handle(m.AccountPause("SIMULATED", 60.0), None, T0)  # a 429 with Retry-After 60 s
    return logic


def every_circuit_open() -> PacerLogic:
    logic = pacer(rps=100, burst=100, concurrency=10)
    for i in range(FAST.failures):
        lease = f"failed-{i}"
        assert sent(logic.handle(request(lease), "coalescer:0", T0), m.OpenStream)
        logic.handle(m.LeaseRelease(lease, None, [[0, False]]), None, T0)
    assert logic.buckets[0].circuit.state == OPEN
    return logic


REFUSALS = {
    "queue_full": (queue_full, 429, "pacer_queue_full"),
    "paused": (paused_past_the_wait, 429, "pacer_queue_timeout"),
    "circuits_open": (every_circuit_open, 503, "upstream_unavailable"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
@pytest.mark.parametrize(
    "hub",
    [
        "pool",
        "pool:1",
        # A Pool this Pacer does not know (its host left, or a Wire not yet here): its clients
        # listen there and nowhere else, so that is still where the FailStream goes.
        "pool:7",
    ],
)
def test_a_request_that_names_its_hub_refused_on_arrival_ends_its_stream_at_that_hub(refusal, hub):
    setup, status, code = REFUSALS[refusal]
    logic = setup()
    out = logic.handle(request("re-ask", hub=hub), "coalescer:0", T0 + 0.1)
    (denied,) = sent(out, m.LeaseDenied)
    assert denied.to == "coalescer:0"
    assert (denied.msg.lease_id, denied.msg.status, denied.msg.code) == ("re-ask", status, code)
    # Its clients hear the refusal the shard got, at the hub the request named.
    assert [(e.to, e.msg.stream_id, e.msg.code, e.msg.message) for e in sent(out, m.FailStream)] == [
        (hub, "re-ask", code, denied.msg.message)
    ]
    assert not sent(out, m.LeaseQueued) and not sent(out, m.OpenStream)
    assert logic.state(T0 + 0.1)["queue_depth"] <= 1  # not queued (queue_full's one waiter stays)


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_first_ask_refused_on_arrival_fails_no_stream(refusal):
    """No hub named: its clients wait for the shard's answer (not admitted, subscribed
    nowhere), and the shard rejects them with the denial."""
    setup, status, code = REFUSALS[refusal]
    logic = setup()
    out = logic.handle(request("first"), "coalescer:0", T0 + 0.1)
    (denied,) = sent(out, m.LeaseDenied)
    assert (denied.msg.lease_id, denied.msg.status, denied.msg.code) == ("first", status, code)
    assert sent(out, m.FailStream) == []


def test_a_queued_request_whose_circuits_open_ends_at_the_hub_it_was_queued_for():
    """Queued, its clients were admitted at the hub `LeaseQueued` named: its stream ends there."""
    logic = pacer(rps=100, burst=100, concurrency=1)
    assert sent(logic.handle(request("running", hub="pool"), "coalescer:0", T0), m.OpenStream)
    (queued,) = sent(logic.handle(request("waiting", hub="pool:1"), "coalescer:0", T0), m.LeaseQueued)
    assert queued.msg.hub == "pool:1"
    logic.handle(m.LeaseRelease("running", None, [[0, False]]), None, T0 + 0.1)  # "waiting" runs now
    logic.handle(m.LeaseRelease("waiting", None, [[0, False]]), None, T0 + 0.2)
    assert sent(logic.handle(request("third", hub="pool"), "coalescer:0", T0 + 0.3), m.OpenStream)
    (queued,) = sent(logic.handle(request("fourth", hub="pool:1"), "coalescer:0", T0 + 0.3), m.LeaseQueued)
    out = logic.handle(m.LeaseRelease("third", None, [[0, False]]), None, T0 + 0.4)  # the third failure opens it
    assert logic.buckets[0].circuit.state == OPEN
    assert [(e.to, e.msg.stream_id, e.msg.code) for e in sent(out, m.FailStream)] == [
        ("pool:1", "fourth", "upstream_unavailable")
    ]
