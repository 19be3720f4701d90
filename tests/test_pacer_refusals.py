"""A request the Pacer refuses as it arrives, on each path that refuses one (queue full,
every key paused past the longest wait, every circuit open): where its stream ends
(actors/pacer_logic.py `_denied_on_arrival`, `_unavailable`; docs/reliability.md, the
Pacer's death).

A request that names its hub (`LeaseRequest.hub`: a re-ask of a replaced Pacer, or a
fallback, after its flight was queued) has clients admitted and listening at that hub:
the shard rejects only those still waiting, so the Pacer ends the stream there
(`FailStream`, with the refusal's code and text). A first ask names none: nobody was
admitted, the shard rejects its clients, and nothing goes to a hub.

A request that names a Pool this Pacer does not know (gone with its host) is refused on
arrival whatever else holds (`_pool_gone`, 503 `pool_lost`), its stream ended at the hub it
names: run on a Pool chosen here, it used to stream where none of its clients listen."""

from __future__ import annotations

import pytest

from actors.circuit import OPEN, CircuitSettings
from actors.coalescer_logic import CoalescerLogic
from actors.pacer_logic import PacerLogic, PacerSettings, PoolAt
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
@pytest.mark.parametrize("hub", ["pool", "pool:1"])
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


def could_grant() -> PacerLogic:
    return pacer(rps=100, burst=100, concurrency=10)


def would_queue() -> PacerLogic:
    logic = pacer(rps=100, burst=100, concurrency=1)
    assert sent(logic.handle(request("running"), "coalescer:0", T0), m.OpenStream)
    return logic


@pytest.mark.parametrize("state", ["could_grant", "would_queue", *REFUSALS])
def test_a_request_that_names_a_pool_this_pacer_does_not_know_ends_at_that_hub(state):
    """A Pool leaves the directory only with its host, never to return: its clients listen
    at its hub and nowhere else. Denied at once as the requests queued for a dead Pool are,
    whatever else would have happened to it; never queued or run on a Pool chosen here."""
    setup = {"could_grant": could_grant, "would_queue": would_queue}.get(state) or REFUSALS[state][0]
    logic = setup()
    out = logic.handle(request("re-ask", hub="pool:7"), "coalescer:0", T0 + 0.1)
    (denied,) = sent(out, m.LeaseDenied)
    assert denied.to == "coalescer:0"
    assert (denied.msg.lease_id, denied.msg.status, denied.msg.code) == ("re-ask", 503, "pool_lost")
    assert denied.msg.retry_after_s == 1.0 and "pool:7" in denied.msg.message
    assert [(e.to, e.msg.stream_id, e.msg.code) for e in sent(out, m.FailStream)] == [("pool:7", "re-ask", "pool_lost")]
    assert not sent(out, m.LeaseQueued) and not sent(out, m.LeaseGranted) and not sent(out, m.OpenStream)
    assert "re-ask" not in logic.in_flight and all(w.lease_id != "re-ask" for w in logic.queue)
    # Nothing of it is dispatched later either: a release grants the others only.
    later = logic.handle(m.LeaseRelease("running", None), None, T0 + 0.2)
    assert all(e.msg.stream_id != "re-ask" for e in sent(later, m.OpenStream))


def test_a_named_pool_that_is_known_but_down_is_kept_and_waited_for():
    """Down is not gone: its replacement comes (the directory still names it), and the
    request's clients subscribe at its hub again. The request waits for it, then runs there."""
    logic = would_queue()
    logic.handle(PoolAt(None, "pool:1"), None, T0)
    (queued,) = sent(logic.handle(request("re-ask", hub="pool:1"), "coalescer:0", T0 + 0.1), m.LeaseQueued)
    assert queued.msg.hub == "pool:1"
    logic.handle(m.LeaseRelease("running", None), None, T0 + 0.2)
    out = logic.handle(PoolAt("127.0.0.1:9", "pool:1"), None, T0 + 0.3)
    assert [(e.to, e.msg.stream_id) for e in sent(out, m.OpenStream)] == [("pool:1", "re-ask")]


def test_the_shard_that_re_asks_for_a_gone_pool_ends_its_stream_forgets_the_flight_and_serves_afresh():
    """The shard side: its flight was queued at a Pacer that died, for a Pool whose host left
    meanwhile. The replacement Pacer (it never knew that Pool) denies the re-ask; the shard
    ends the stream at the hub its admitted clients listen at and forgets the flight, so an identical
    request starts a new flight on a Pool that exists rather than joining the dead one."""
    old = pacer(rps=100, burst=100, concurrency=1)
    old.pools = PoolChoice(["pool", "pool:7"])
    shard = CoalescerLogic(me="coalescer:0", secret=b"s")
    submit = m.Submit("r-1", "k", "simulated", "sim-1", {}, "edge-1", T0)
    (ask,) = [e.msg for e in shard.handle(submit, "edge", T0) if isinstance(e.msg, m.LeaseRequest)]
    assert sent(old.handle(request("running"), "coalescer:0", T0), m.OpenStream)
    old.handle(request("other", hub="pool"), "coalescer:0", T0)  # pool is busier: ask goes to pool:7
    (queued,) = sent(old.handle(ask, "shard", T0), m.LeaseQueued)
    assert queued.msg.hub == "pool:7"
    (admitted,) = [e.msg for e in shard.handle(queued.msg, "pacer", T0) if isinstance(e.msg, m.Admitted)]
    assert admitted.hub == "pool:7"

    new = pacer(rps=100, burst=100, concurrency=10)  # its directory: pool, pool:1
    (re_ask,) = [e.msg for e in shard.handle(m.MemberLost("pacer:simulated", "old"), None, T0 + 1)]
    assert re_ask.hub == "pool:7"
    out = new.handle(re_ask, "shard", T0 + 1)
    (denied,) = sent(out, m.LeaseDenied)
    assert [(e.to, e.msg.code) for e in sent(out, m.FailStream)] == [("pool:7", "pool_lost")]
    # Its clients were admitted (nobody waits for an answer), and listen at pool:7: the shard
    # ends the stream there itself, since this Pacer has no address for pool:7.
    shard_out = shard.handle(denied.msg, "pacer", T0 + 1)
    assert [(e.to, e.msg.stream_id, e.msg.code) for e in shard_out] == [("pool:7", ask.lease_id, "pool_lost")]
    again = shard.handle(m.Submit("r-2", "k", "simulated", "sim-1", {}, "edge-1", T0 + 2), "edge", T0 + 2)
    (fresh,) = [e.msg for e in again if isinstance(e.msg, m.LeaseRequest)]
    assert fresh.lease_id != ask.lease_id and fresh.hub == ""
    (granted,) = sent(new.handle(fresh, "shard", T0 + 2), m.LeaseGranted)
    assert granted.msg.hub in {"pool", "pool:1"}


def test_a_first_ask_denied_ends_no_stream_at_the_shard_only_its_waiting_clients_are_rejected():
    shard = CoalescerLogic(me="coalescer:0", secret=b"s")
    submit = m.Submit("r-1", "k", "simulated", "sim-1", {}, "edge-1", T0)
    (ask,) = [e.msg for e in shard.handle(submit, "edge", T0) if isinstance(e.msg, m.LeaseRequest)]
    out = shard.handle(m.LeaseDenied(ask.lease_id, 429, "pacer_queue_full", "full", 1.0), "pacer", T0)
    assert [type(e.msg) for e in out] == [m.Rejected]
