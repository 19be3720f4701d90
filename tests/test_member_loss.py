"""actors/member_loss.py: who hears that a member died, and when — the Supervisor's rule
(actors/supervisor.py), played by the simulator (sim/harness.py) with the same code."""

from __future__ import annotations

import pytest

from actors.member_loss import LostMembers, edge_lost_targets
from protocols import messages as m
from sim.harness import Simulation

pytestmark = pytest.mark.unit

MEMBERS = ["metrics", "pool", "pool:1", "threads", "pacer:openai", "pacer:simulated", "coalescer:0", "coalescer:1"]


def test_a_dead_pool_is_announced_to_every_pacer_and_shard_and_nobody_else():
    lost = LostMembers()
    lost.died("pool", "127.0.0.1:4001")
    assert lost.announce(MEMBERS) == [
        (m.MemberLost("pool", "127.0.0.1:4001"), ["pacer:openai", "pacer:simulated", "coalescer:0", "coalescer:1"])
    ]
    assert lost.announce(MEMBERS) == []  # announced once, then forgotten


def test_a_dead_pacer_or_shard_is_not_told_of_its_own_death():
    # A shard's death goes to the Pools too: their hubs end the streams it left unopened.
    lost = LostMembers()
    lost.died("coalescer:1", "127.0.0.1:4002")
    lost.died("pacer:simulated", "127.0.0.1:4003")
    lost.died("coalescer:1", "127.0.0.1:4004")  # died again before the announcement
    shard_hearers = ["pool", "pool:1", "pacer:openai", "pacer:simulated", "coalescer:0"]
    assert lost.announce(MEMBERS) == [
        (m.MemberLost("coalescer:1", "127.0.0.1:4002"), shard_hearers),
        (m.MemberLost("coalescer:1", "127.0.0.1:4004"), shard_hearers),
        (m.MemberLost("pacer:simulated", "127.0.0.1:4003"), ["pacer:openai", "coalescer:0", "coalescer:1"]),
    ]


def test_metrics_and_the_thread_store_hold_nothing_for_others():
    lost = LostMembers()
    lost.died("metrics", "127.0.0.1:4005")
    lost.died("threads", "127.0.0.1:4006")
    assert lost.announce(MEMBERS) == [] and lost.pending == {}


def test_a_dead_edge_is_told_to_every_shard_metrics_and_the_thread_store():
    assert edge_lost_targets(MEMBERS) == ["metrics", "threads", "coalescer:0", "coalescer:1"]


def test_the_simulated_supervisor_announces_once_every_member_is_up_again():
    sim = Simulation(seed=5, shards=2)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=5)
    sim.client(at=0.0, text="a")
    sim.kill("pool", at=0.05, restart_s=0.3)
    sim.kill("coalescer:0", at=0.1, restart_s=0.5)  # still down when the Pool is back
    sim.run()
    announced = sim.messages(m.MemberLost, src="supervisor")
    assert sorted((d.dst, d.msg.role) for d in announced) == [
        ("coalescer:0", "pool"),
        ("coalescer:1", "coalescer:0"),
        ("coalescer:1", "pool"),
        ("pacer:simulated", "coalescer:0"),
        ("pacer:simulated", "pool"),
        ("pool", "coalescer:0"),
    ]
    assert min(d.sent_at for d in announced) == pytest.approx(0.6)  # the shard's restart, not the Pool's
