"""`CoalescerLogic.asking`: the count of a shard's flights waiting for a lease, per Pacer,
which a new leader reads (`_waits_at`) to know whether it may take a lease-slice grant
(FIFO: never ahead of its own shard's waiting flight; docs/architecture.md "Lease
slices", rule 4). It is kept at every change instead of scanning every flight per
request; here it is checked against that scan after every message of random runs:
flights starting (asking, or opened from a slice), queued, granted, denied, falling back
to another account, cancelled, finishing before or after their grant, and Pacers, Pools
and edges being replaced."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from actors.coalescer_logic import STREAMING, CoalescerLogic
from protocols import messages as m
from protocols import roles

pytestmark = pytest.mark.unit

PROVIDERS = ["simulated", "openai"]
EDGES = ["e1", "e2", "e3"]


def scanned(logic: CoalescerLogic) -> Counter:
    """What `asking` must be: the scan it replaced."""
    return Counter(roles.pacer_for(f.provider) for f in logic.by_stream.values() if f.phase != STREAMING)


def submit(rng: random.Random, n: int) -> m.Submit:
    key = f"k{rng.randrange(12)}" if rng.random() < 0.8 else ""  # "": never coalesced
    provider = rng.choice(PROVIDERS)
    return m.Submit(f"r{n}", key, provider, "model-1", {"messages": []}, rng.choice(EDGES), 0.0)


def slice_grant(rng: random.Random, n: int, pacer: str) -> m.SliceGrant:
    grants = [[f"g{n}.{i}", 0, [0], "pool", "pool@1", ""] for i in range(rng.randrange(1, 4))]
    return m.SliceGrant(pacer, f"{pacer}@1", grants, 4)


def a_message(rng: random.Random, logic: CoalescerLogic, n: int):
    flights = list(logic.by_stream.values())
    waiting = [f for f in flights if f.phase != STREAMING]
    pick = rng.random()
    if pick < 0.3 or not flights:
        return submit(rng, n)
    flight = rng.choice(waiting) if waiting and rng.random() < 0.7 else rng.choice(flights)
    sid = flight.stream_id
    hub = rng.choice(["pool", "pool:1"])
    kinds = [
        lambda: m.LeaseQueued(sid, 1, hub),
        lambda: m.LeaseGranted(sid, 1.0, "pool@1", hub),
        lambda: m.LeaseDenied(sid, 429, "pacer_queue_full", "full", 1.0),
        lambda: m.LeaseFallback(sid, rng.choice(PROVIDERS), "model-2", [], flight.provider, "circuits_open"),
        lambda: m.Cancel(sid, rng.choice(list(flight.refs) or EDGES), 0.0),
        lambda: m.StreamFinished(sid, rng.choice(["done", "error", "cancelled"]), None, hub),
        lambda: m.MemberLost(roles.pacer_for(rng.choice(PROVIDERS)), "old-pacer"),
        lambda: m.MemberLost(rng.choice(["pool", "pool:1"]), "pool@1"),
        lambda: m.MemberLost(roles.EDGE, rng.choice(EDGES)),
        lambda: slice_grant(rng, n, roles.pacer_for(rng.choice(PROVIDERS))),
        lambda: m.SliceRecall(roles.pacer_for(rng.choice(PROVIDERS))),
    ]
    return rng.choice(kinds)()


@pytest.mark.parametrize("seed", range(30))
def test_the_count_of_asking_flights_is_the_scan_after_every_message(seed):
    rng = random.Random(seed)
    logic = CoalescerLogic(me="coalescer:0", secret=b"s")
    seen = Counter()
    for n in range(400):
        msg = a_message(rng, logic, n)
        logic.handle(msg, f"edge:{n}", n * 0.01)
        seen[type(msg).__name__] += 1
        assert logic.asking == scanned(logic), (n, msg)
        for provider in PROVIDERS:
            pacer = roles.pacer_for(provider)
            assert logic._waits_at(pacer) == (scanned(logic)[pacer] > 0)
    assert seen["Submit"] > 50 and seen["LeaseGranted"] > 5 and seen["LeaseFallback"] > 5, seen


def test_a_flight_counts_at_its_pacer_until_granted_and_moves_with_a_fallback():
    logic = CoalescerLogic(me="coalescer:0", secret=b"s")
    logic.handle(m.Submit("r1", "k1", "simulated", "model-1", {}, "e1", 0.0), "edge:1", 0.0)
    [flight] = logic.by_stream.values()
    assert logic.asking == {"pacer:simulated": 1}
    logic.handle(m.LeaseQueued(flight.stream_id, 1, "pool"), "pacer", 0.1)
    assert logic.asking == {"pacer:simulated": 1}, "queued still waits"
    logic.handle(m.LeaseFallback(flight.stream_id, "openai", "gpt", [], "simulated", "queue"), "pacer", 0.2)
    assert logic.asking == {"pacer:openai": 1}
    logic.handle(m.MemberLost("pacer:openai", "old"), "supervisor", 0.3)  # asks the replacement
    assert logic.asking == {"pacer:openai": 1}
    logic.handle(m.LeaseGranted(flight.stream_id, 1.0, "pool@1", "pool"), "pacer", 0.4)
    assert logic.asking == {}
    logic.handle(m.Submit("r2", "k2", "simulated", "model-1", {}, "e1", 0.5), "edge:1", 0.5)
    logic.handle(m.Cancel(logic.by_key["k2"].stream_id, "e1", 0.6), "edge:1", 0.6)
    assert logic.asking == {}, "a cancelled asking flight no longer waits"
