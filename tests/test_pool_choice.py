"""Routing over several Pools: actors/pool_choice.py, and the Pacer and Coalescer logic
that name the chosen Pool (LeaseQueued/LeaseGranted.hub, Admitted.hub) and keep it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from actors.coalescer_logic import CoalescerLogic
from actors.pacer_logic import PacerLogic, PacerSettings, PoolAt
from actors.pool_choice import LOCAL_FACTOR, LOCAL_SLACK, PoolChoice, spill
from protocols import messages as m

pytestmark = pytest.mark.unit

POOLS = ["pool", "pool:1"]


def sends(effects, kind):
    return [e for e in effects if isinstance(getattr(e, "msg", None), kind)]


def request(n: int, hub: str = "", host: str = "") -> m.LeaseRequest:
    return m.LeaseRequest(f"s-{n}", "simulated", 0.0, "sim-1", {"messages": []}, "coalescer:0", hub=hub, host=host)


def pacer(**settings) -> PacerLogic:
    logic = PacerLogic("simulated", PacerSettings(**settings))
    logic.pools = PoolChoice(POOLS)
    return logic


# --- the choice --------------------------------------------------------------------------


def test_least_loaded_wins_and_equals_take_turns():
    choice = PoolChoice(["pool", "pool:1", "pool:2"])
    assert [choice.choose({}) for _ in range(4)] == ["pool", "pool:1", "pool:2", "pool"]
    assert choice.choose({"pool": 3, "pool:1": 1, "pool:2": 2}) == "pool:1"
    assert choice.choose({"pool": 0, "pool:1": 5, "pool:2": 0}) == "pool:2"  # after pool:1, the next of the least


def test_a_pool_that_is_down_is_not_chosen_unless_all_are():
    choice = PoolChoice(POOLS)
    choice.place("pool", None)
    assert [choice.choose({"pool:1": 9}) for _ in range(3)] == ["pool:1"] * 3
    choice.place("pool:1", None)
    assert choice.choose({"pool:1": 9}) == "pool"  # none up: the least loaded of all, grant waits
    choice.place("pool", "127.0.0.1:2")
    assert choice.up() == ["pool"] and choice.incarnation("pool") == "127.0.0.1:2"


def test_a_pool_on_the_requests_host_is_preferred():
    # Hosts A (pool, pool:1) and B (pool:2, pool:3).
    hosts = {"pool": "A", "pool:1": "A", "pool:2": "B", "pool:3": "B"}
    choice = PoolChoice(list(hosts), hosts)
    assert [choice.choose({}, near="B") for _ in range(3)] == ["pool:2", "pool:3", "pool:2"]
    assert choice.choose({"pool:2": 3, "pool:3": 1}, near="B") == "pool:3"  # the least loaded of B's
    assert choice.choose({"pool:2": 3, "pool:3": 1}, near="A") in ("pool", "pool:1")
    loads = {"pool": 1, "pool:1": 0, "pool:2": 1, "pool:3": 1}
    assert choice.choose(loads, near="") == "pool:1"  # no host said: the least loaded of all
    assert choice.choose(loads, near="C") == "pool:1"  # a host with no Pool: the same


def test_a_host_whose_pools_are_down_or_much_busier_sends_the_call_elsewhere():
    hosts = {"pool": "A", "pool:1": "B"}
    choice = PoolChoice(list(hosts), hosts)
    choice.place("pool:1", None)
    assert choice.choose({}, near="B") == "pool"  # B's Pool is being replaced: not waited for
    choice.place("pool:1", "10.0.0.2:3", "B")
    # B keeps its calls up to LOCAL_FACTOR x the other's + LOCAL_SLACK, then spills over.
    assert choice.choose({"pool:1": LOCAL_SLACK, "pool": 0}, near="B") == "pool:1"
    assert choice.choose({"pool:1": LOCAL_SLACK + 1, "pool": 0}, near="B") == "pool"
    busy = LOCAL_FACTOR * 10 + LOCAL_SLACK
    assert choice.choose({"pool:1": busy, "pool": 10}, near="B") == "pool:1"
    assert choice.choose({"pool:1": busy + 1, "pool": 10}, near="B") == "pool"
    assert spill(5, 0) and not spill(4, 0)


def test_place_keeps_a_pools_host_when_the_directory_does_not_say():
    choice = PoolChoice(["pool"], {"pool": "A"})
    choice.place("pool", None)
    choice.place("pool", "a:2")
    assert choice.hosts == {"pool": "A"}


# --- the Pacer ---------------------------------------------------------------------------


def test_the_pacer_prefers_a_pool_on_the_host_the_request_came_from():
    logic = pacer(rps=100, burst=100, concurrency=100)
    logic.handle(PoolAt("a:1", "pool", "10.0.0.1:19500"), None, 0.0)
    logic.handle(PoolAt("b:1", "pool:1", "10.0.0.2:19500"), None, 0.0)
    at_b = [logic.handle(request(n, host="10.0.0.2:19500"), "coalescer:0", 0.0) for n in range(3)]
    assert [sends(o, m.OpenStream)[0].to for o in at_b] == ["pool:1"] * 3  # least loaded would alternate
    assert [sends(o, m.LeaseGranted)[0].msg.hub for o in at_b] == ["pool:1"] * 3
    out = logic.handle(request(3, host="10.0.0.1:19500"), "coalescer:0", 0.0)
    assert sends(out, m.OpenStream)[0].to == "pool"
    assert logic.state(0.0)["pools"]["pool:1"] == {
        "in_flight": 3,
        "held": 0,
        "queued": 0,
        "up": True,
        "host": "10.0.0.2:19500",
    }
    logic.handle(PoolAt(None, "pool:1"), None, 0.1)  # B's Pool is down: B's requests go to A's
    out = logic.handle(request(4, host="10.0.0.2:19500"), "coalescer:0", 0.1)
    assert sends(out, m.OpenStream)[0].to == "pool"


def test_a_queued_request_is_given_a_pool_on_its_host():
    logic = pacer(rps=1, burst=1, concurrency=10)
    logic.handle(PoolAt("a:1", "pool", "A"), None, 0.0)
    logic.handle(PoolAt("b:1", "pool:1", "B"), None, 0.0)
    logic.handle(request(0, host="B"), "coalescer:0", 0.0)  # granted on pool:1
    out = logic.handle(request(1, host="B"), "coalescer:0", 0.0)
    assert sends(out, m.LeaseQueued)[0].msg.hub == "pool:1"


def test_grants_alternate_over_the_pools_and_name_the_pool():
    logic = pacer(rps=100, burst=100, concurrency=100)
    hubs = []
    for n in range(4):
        out = logic.handle(request(n), "coalescer:0", 0.0)
        (opened,) = sends(out, m.OpenStream)
        (granted,) = sends(out, m.LeaseGranted)
        assert opened.to == granted.msg.hub == granted.msg.pool  # the incarnation is the role before a directory
        hubs.append(opened.to)
    assert hubs == ["pool", "pool:1", "pool", "pool:1"]
    assert logic.state(0.0)["pools"] == {
        "pool": {"in_flight": 2, "held": 0, "queued": 0, "up": True, "host": ""},
        "pool:1": {"in_flight": 2, "held": 0, "queued": 0, "up": True, "host": ""},
    }


def test_the_pool_with_fewer_calls_gets_the_next_one():
    logic = pacer(rps=100, burst=100, concurrency=100)
    for n in range(4):
        logic.handle(request(n), "coalescer:0", 0.0)  # s-0, s-2 on pool; s-1, s-3 on pool:1
    logic.handle(m.LeaseRelease("s-1"), "pool:1", 0.1)
    logic.handle(m.LeaseRelease("s-3"), "pool:1", 0.1)
    out = logic.handle(request(9), "coalescer:0", 0.2)
    assert [e.to for e in sends(out, m.OpenStream)] == ["pool:1"]


def test_a_queued_request_names_its_pool_and_is_granted_there():
    logic = pacer(rps=1, burst=1, concurrency=10)
    logic.handle(request(0), "coalescer:0", 0.0)  # granted: pool
    out = logic.handle(request(1), "coalescer:0", 0.0)
    (queued,) = sends(out, m.LeaseQueued)
    assert queued.msg.hub == "pool:1"
    out = logic.handle(request(2), "coalescer:0", 0.0)
    assert sends(out, m.LeaseQueued)[0].msg.hub == "pool"  # one each by now: the turn goes on
    out = logic.handle(m.LeaseRelease("s-0"), "pool", 1.0)
    assert [(e.to, e.msg.stream_id) for e in sends(out, m.OpenStream)] == [("pool:1", "s-1")]


def test_a_request_that_names_its_pool_keeps_it():
    logic = pacer(rps=100, burst=100, concurrency=100)
    out = [logic.handle(request(n, hub="pool:1"), "coalescer:0", 0.0) for n in range(3)]
    assert [sends(o, m.OpenStream)[0].to for o in out] == ["pool:1"] * 3
    # Not a Pool it knows: gone with its host, where the request's clients listen. Denied,
    # its stream ended there; never run on another Pool (tests/test_pacer_refusals.py).
    out = logic.handle(request(7, hub="pool:9"), "coalescer:0", 0.0)
    assert not sends(out, m.OpenStream)
    assert [(e.to, e.msg.code) for e in sends(out, m.FailStream)] == [("pool:9", "pool_lost")]


def test_the_head_of_the_queue_waits_for_its_pool_and_those_behind_wait_in_order():
    logic = pacer(rps=100, burst=100, concurrency=100)
    logic.handle(PoolAt(None, "pool:1"), None, 0.0)
    out = logic.handle(request(0, hub="pool:1"), "coalescer:0", 0.0)
    assert sends(out, m.LeaseQueued) and not sends(out, m.OpenStream)
    out = logic.handle(request(1), "coalescer:0", 0.0)
    assert sends(out, m.LeaseQueued)[0].msg.hub == "pool" and not sends(out, m.OpenStream)  # FIFO
    out = logic.handle(PoolAt("127.0.0.1:9", "pool:1"), None, 0.5)
    assert [(e.to, e.msg.stream_id) for e in sends(out, m.OpenStream)] == [("pool:1", "s-0"), ("pool", "s-1")]
    assert sends(out, m.LeaseGranted)[0].msg.pool == "127.0.0.1:9"


def test_a_lost_pool_gives_back_only_its_leases_and_ends_what_was_queued_for_it():
    logic = pacer(rps=100, burst=100, concurrency=2)
    logic.handle(PoolAt("a:1", "pool"), None, 0.0)
    logic.handle(PoolAt("b:1", "pool:1"), None, 0.0)
    for n in range(4):  # s-0 on pool, s-1 on pool:1 granted; s-2 (pool), s-3 (pool:1) queued
        logic.handle(request(n), "coalescer:0", 0.0)
    assert logic.state(0.0)["pools"]["pool"] == {"in_flight": 1, "held": 0, "queued": 1, "up": True, "host": ""}
    logic.handle(PoolAt(None, "pool"), None, 0.1)  # the Wire without it
    logic.handle(PoolAt("a:2", "pool"), None, 0.4)  # its replacement
    out = logic.handle(m.MemberLost("pool", "a:1"), "supervisor", 0.5)
    assert sorted(logic.in_flight) == ["s-1", "s-3"]  # s-0 reclaimed; s-3 granted on pool:1 now
    (denied,) = sends(out, m.LeaseDenied)
    assert denied.msg.lease_id == "s-2" and denied.msg.code == "pool_lost"
    assert [(e.to, e.msg.stream_id) for e in sends(out, m.FailStream)] == [("pool", "s-2")]
    assert [(e.to, e.msg.stream_id) for e in sends(out, m.OpenStream)] == [("pool:1", "s-3")]


def test_cancel_and_queue_timeout_fail_the_stream_at_its_own_pool():
    # max wait 1.2 s: its token is back at 1.0 s, in time (a wait that cannot end in time is denied at once)
    logic = pacer(rps=1, burst=1, concurrency=10, max_wait_s=1.2)
    logic.handle(request(0), "coalescer:0", 0.0)  # granted on pool
    logic.handle(request(1), "coalescer:0", 0.0)  # queued for pool:1
    out = logic.handle(m.LeaseCancel("s-0"), "coalescer:0", 0.1)
    assert [e.to for e in sends(out, m.FailStream)] == ["pool"]
    logic.buckets[0].tokens = 0.0
    out = logic.handle(m.LeaseRelease("none"), "pool", 1.5)  # any message past s-1's wait
    assert [(e.to, e.msg.code) for e in sends(out, m.FailStream)] == [("pool:1", "pacer_queue_timeout")]


# --- the Coalescer ------------------------------------------------------------------------


def coalescer() -> CoalescerLogic:
    ids = iter(f"s-{n}" for n in range(100))
    return CoalescerLogic(me="coalescer:0", secret=b"k" * 32, new_stream_id=lambda: next(ids))


def submit(n: int, edge: str = "e1", key: str = "k") -> m.Submit:
    return m.Submit(f"r{n}", key, "simulated", "sim-1", {"messages": []}, edge, 0.0)


def test_admitted_names_the_pool_for_the_leader_and_every_later_follower():
    c = coalescer()
    (ask,) = c.handle(submit(1), "edge-1", 0.0)
    assert ask.msg.hub == ""  # the Pacer chooses
    assert c.handle(submit(2, "e2"), "edge-2", 0.0) == []  # asking: waits with the leader
    out = c.handle(m.LeaseQueued("s-0", 1, "pool:1"), "pacer", 0.0)
    assert [e.msg.hub for e in out] == ["pool:1", "pool:1"]
    (late,) = c.handle(submit(3, "e3"), "edge-3", 0.1)
    assert late.msg.hub == "pool:1"
    c.handle(m.LeaseGranted("s-0", 5.0, "b:1", "pool:1"), "pacer", 0.2)
    (later,) = c.handle(submit(4, "e3"), "edge-3", 0.3)
    assert later.msg.hub == "pool:1"
    for edge in ("e1", "e2", "e3", "e3"):
        out = c.handle(m.Cancel("s-0", edge, 0.4), "edge", 0.4)
    assert [(e.to, type(e.msg).__name__) for e in out] == [("pool:1", "AbortStream")]


def test_the_leaders_host_goes_with_the_lease_request_and_stays_when_asking_again():
    c = coalescer()
    (ask,) = c.handle(replace(submit(1), host="B"), "edge-1", 0.0)
    assert ask.msg.host == "B"
    assert c.handle(replace(submit(2, "e2"), host="A"), "edge-2", 0.0) == []  # a follower: the flight's host stays
    (fallback,) = c.handle(m.LeaseFallback("s-0", "openai", "gpt", [], "simulated", "queue"), "pacer", 0.1)
    assert fallback.msg.host == "B"
    (again,) = c.handle(m.MemberLost("pacer:openai", "pacer@1"), "supervisor", 0.5)
    assert again.msg.host == "B"


def test_a_call_that_ends_before_its_grant_admits_at_the_pool_that_ran_it():
    c = coalescer()
    c.handle(submit(1), "edge-1", 0.0)
    out = c.handle(m.StreamFinished("s-0", "done", None, "pool:1"), "b:1", 0.1)
    assert [(e.msg.stream_id, e.msg.hub) for e in out] == [("s-0", "pool:1")]


def test_asking_again_keeps_the_pool_the_clients_listen_at():
    c = coalescer()
    c.handle(submit(1), "edge-1", 0.0)
    c.handle(m.LeaseQueued("s-0", 1, "pool:1"), "pacer", 0.0)
    (again,) = c.handle(m.MemberLost("pacer:simulated", "pacer@1"), "supervisor", 0.5)
    assert again.msg.hub == "pool:1" and again.to == "pacer:simulated"
    (fallback,) = c.handle(m.LeaseFallback("s-0", "openai", "gpt", [], "simulated", "queue"), "pacer", 0.6)
    assert fallback.msg.hub == "pool:1" and fallback.to == "pacer:openai"
    out = c.handle(m.Cancel("s-0", "e1", 0.7), "edge", 0.7)
    assert [(e.to, type(e.msg).__name__) for e in out] == [("pacer:openai", "LeaseCancel"), ("pool:1", "FailStream")]


def test_a_lost_pool_ends_only_its_own_flights():
    c = coalescer()
    c.handle(submit(1, key="a"), "edge-1", 0.0)
    c.handle(submit(2, key="b"), "edge-1", 0.0)
    c.handle(m.LeaseGranted("s-0", 0.0, "a:1", "pool"), "pacer", 0.0)
    c.handle(m.LeaseGranted("s-1", 0.0, "b:1", "pool:1"), "pacer", 0.0)
    out = c.handle(m.MemberLost("pool:1", "b:1"), "supervisor", 0.5)
    assert [(e.to, e.msg.stream_id, e.msg.code) for e in out] == [("pool:1", "s-1", "pool_lost")]
    assert list(c.by_stream) == ["s-0"]
