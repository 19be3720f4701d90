"""Where each actor may run in a Convention of several hosts (actors/placement.py), and the
SLUICE_JOIN setting that makes a host a member (protocols/config.py). Plain functions: the
real Convention is exercised by tests/test_scale_out.py."""

from __future__ import annotations

import pytest

from actors import placement
from actors.coalescer import CoalescerActor
from actors.metrics import MetricsActor
from actors.pacer import PacerActor
from actors.pool import PoolActor
from actors.supervisor import SupervisorActor
from actors.threads_store import ThreadStoreActor
from protocols import config, roles

pytestmark = pytest.mark.unit

LEADER = placement.capabilities("10.0.0.1", 19500, None, 2)
MEMBER = placement.capabilities("10.0.0.2", 19500, "10.0.0.1:19500", 3)
LEADER_ONLY = (SupervisorActor, PacerActor, MetricsActor, ThreadStoreActor)


def test_a_member_names_its_leader_and_a_leader_names_none():
    assert MEMBER[placement.CONVENTION_ADDRESS] == "10.0.0.1:19500" and MEMBER[placement.LEADER] is False
    assert placement.CONVENTION_ADDRESS not in LEADER and LEADER[placement.LEADER] is True
    assert MEMBER["Admin Port"] == 19500 and MEMBER[placement.HOST] == "10.0.0.2:19500"


@pytest.mark.parametrize("actor", LEADER_ONLY, ids=lambda a: a.__name__)
def test_the_shared_actors_run_on_the_leader_only(actor):
    # A member's admin refuses them and forwards the request (a global-name lookup included)
    # to the leader: that is how a member's edges find the leader's Supervisor.
    assert actor.actorSystemCapabilityCheck(LEADER, {}) is True
    assert actor.actorSystemCapabilityCheck(MEMBER, {}) is False


@pytest.mark.parametrize("actor", (PoolActor, CoalescerActor), ids=lambda a: a.__name__)
def test_a_pool_or_a_shard_runs_where_its_requirements_say(actor):
    on_member = {placement.HOST: MEMBER[placement.HOST]}
    assert actor.actorSystemCapabilityCheck(MEMBER, on_member) is True
    assert actor.actorSystemCapabilityCheck(LEADER, on_member) is False
    # The leader's own Pools and shards name no host.
    assert actor.actorSystemCapabilityCheck(LEADER, {}) is True
    assert actor.actorSystemCapabilityCheck(MEMBER, {}) is False


def test_a_system_without_sluice_capabilities_runs_everything():
    # Benches and test probes start a bare actor system: one host, as before.
    bare = {"Admin Port": 1900}
    assert all(actor.actorSystemCapabilityCheck(bare, {}) for actor in (*LEADER_ONLY, PoolActor))


def test_member_of_reads_what_the_supervisor_needs_and_ignores_strangers():
    assert placement.member_of(MEMBER) == {"host": "10.0.0.2:19500", "actor_host": "10.0.0.2", "pools": 3}
    assert placement.member_of(LEADER) is None  # a leader is not a member
    assert placement.member_of({"Admin Port": 1900}) is None  # no sluice host
    assert placement.member_of({**MEMBER, placement.POOLS: 0}) is None
    assert placement.member_of({**MEMBER, placement.POOLS: True}) is None


@pytest.mark.parametrize(
    "raw, parsed",
    [("", None), ("10.0.0.1:19500", "10.0.0.1:19500"), (" leader.internal:1 ", "leader.internal:1")],
)
def test_sluice_join_is_a_leader_address(raw, parsed):
    settings = config.load({"SLUICE_JOIN": raw, "SLUICE_CLUSTER_SECRET": "x" * 40})
    assert settings.join == parsed


@pytest.mark.parametrize("raw", ["10.0.0.1", ":19500", "10.0.0.1:0", "10.0.0.1:70000", "0.0.0.0:19500", "host:port"])
def test_a_bad_sluice_join_is_refused_with_its_name(raw):
    with pytest.raises(config.ConfigError, match="SLUICE_JOIN"):
        config.load({"SLUICE_JOIN": raw, "SLUICE_CLUSTER_SECRET": "x" * 40})


def test_joining_needs_the_clusters_secret():
    with pytest.raises(config.ConfigError, match="SLUICE_JOIN needs SLUICE_CLUSTER_SECRET"):
        config.load({"SLUICE_JOIN": "10.0.0.1:19500"})


def shards(n: int) -> dict[str, str | None]:
    return {roles.coalescer(i): None for i in range(n)}


def test_a_member_that_joins_takes_its_share_of_the_leaders_shards():
    homes = shards(8)
    assert placement.shards_to_take(homes, 2) == ["coalescer:7", "coalescer:6", "coalescer:5", "coalescer:4"]
    homes.update(dict.fromkeys(["coalescer:7", "coalescer:6", "coalescer:5", "coalescer:4"], "b"))
    # The third host's share (8 // 3) comes from the leader; b keeps its four.
    assert placement.shards_to_take(homes, 3) == ["coalescer:3", "coalescer:2"]
    # Two shards, two hosts (the default): the member runs coalescer:1.
    assert placement.shards_to_take(shards(2), 2) == ["coalescer:1"]
    # Fewer shards than hosts: a late member takes none.
    assert placement.shards_to_take({"coalescer:0": None, "coalescer:1": "b"}, 3) == []
    assert placement.shards_to_take(shards(1), 2) == []


def test_a_lost_members_shards_come_back_to_the_leader():
    homes = {"coalescer:0": None, "coalescer:1": "b", "coalescer:2": "c", "coalescer:3": "b"}
    assert placement.rehome(homes, "b") == ["coalescer:1", "coalescer:3"]
    assert placement.rehome(homes, "d") == []


@pytest.mark.parametrize("seed", range(40))
def test_joins_and_losses_keep_every_shard_on_exactly_one_live_host(seed):
    """Members join and are lost at random (the Supervisor's two calls, in its order):
    every shard always has one home, a live host; a member's shards never move while it
    lives; each member holds at most shards // hosts it saw when it joined."""
    import random

    rng = random.Random(seed)
    count = rng.randint(1, 12)
    homes = shards(count)
    live: dict[str, int] = {}  # member -> its share when it joined
    for step in range(30):
        previous = dict(homes)
        if live and rng.random() < 0.4:
            lost = rng.choice(sorted(live))
            back = placement.rehome(homes, lost)
            assert back == sorted((r for r, h in homes.items() if h == lost), key=roles.coalescer_shard)
            homes.update(dict.fromkeys(back, None))
            del live[lost]
        else:
            member = f"m{step}"
            before = dict(homes)
            taken = placement.shards_to_take(homes, len(live) + 2)
            assert all(before[r] is None for r in taken), "only the leader's shards move"
            homes.update(dict.fromkeys(taken, member))
            live[member] = count // (len(live) + 2)
            assert len(taken) <= live[member]
        assert sorted(homes) == sorted(shards(count)), "the shard count never changes"
        assert all(homes[r] == h for r, h in previous.items() if h in live), "a live member's shards stay"
        assert all(h is None or h in live for h in homes.values()), "every shard on a live host"
        for member, share in live.items():
            assert sum(1 for h in homes.values() if h == member) <= share
