"""Where each actor may run in a Convention of several hosts (actors/placement.py), and the
SLUICE_JOIN setting that makes a host a member (protocols/config.py). Plain functions: the
real Convention is exercised by tests/test_scale_out.py."""

from __future__ import annotations

import itertools
import random

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


def apply(homes: dict[str, str | None], moves: dict[str, str | None]) -> dict[str, str | None]:
    return {**homes, **moves}


def counts(homes: dict[str, str | None], hosts) -> list[int]:
    return [sum(1 for h in homes.values() if h == host) for host in hosts]


def even(homes: dict[str, str | None], hosts) -> bool:
    share = len(homes) // len(hosts)
    return all(share <= n <= share + 1 for n in counts(homes, hosts)) and sum(counts(homes, hosts)) == len(homes)


def fewest_moves(homes: dict[str, str | None], hosts) -> int:
    """The least number of shards on live hosts that must move to an even spread: a host
    holding more than share + 1 gives the rest, and of those left with share + 1 only
    `shards % hosts` may keep it."""
    share, extra = divmod(len(homes), len(hosts))
    held = counts(homes, hosts)
    return sum(max(0, n - share - 1) for n in held) + max(0, sum(1 for n in held if n > share) - extra)


def test_a_member_that_joins_takes_its_share_from_the_leader_first():
    homes = shards(8)
    moves = placement.spread(homes, [None, "b"])
    assert moves == dict.fromkeys(["coalescer:7", "coalescer:6", "coalescer:5", "coalescer:4"], "b")
    homes = apply(homes, moves)
    # A third host: the leader and b give one each (3, 3, 2: the members keep the extras
    # only where the leader holds no more than they do).
    assert placement.spread(homes, [None, "b", "c"]) == {"coalescer:7": "c", "coalescer:3": "c"}
    # Two shards, two hosts (the default): the member runs coalescer:1.
    assert placement.spread(shards(2), [None, "b"]) == {"coalescer:1": "b"}
    # Fewer shards than hosts: a late member takes none (every host holds 0 or 1).
    assert placement.spread({"coalescer:0": None, "coalescer:1": "b"}, [None, "b", "c"]) == {}
    assert placement.spread(shards(1), [None, "b"]) == {}


def test_joins_in_turn_leave_an_even_spread_and_a_member_gives_to_a_newcomer():
    # The uneven spread the first rule left (a: 1/2, b: 1/3, the leader 1/6) cannot happen:
    # b takes one of the leader's and one of a's.
    homes = apply(shards(6), placement.spread(shards(6), [None, "a"]))
    assert counts(homes, [None, "a"]) == [3, 3]
    moves = placement.spread(homes, [None, "a", "b"])
    assert sorted(moves.values()) == ["b", "b"] and sorted(homes[r] or "leader" for r in moves) == ["a", "leader"]
    homes = apply(homes, moves)
    assert counts(homes, [None, "a", "b"]) == [2, 2, 2]
    # a is lost: its two shards are recreated where the spread needs them, one each.
    lost = placement.spread(homes, [None, "b"])
    assert sorted(lost) == sorted(r for r, h in homes.items() if h == "a")
    homes = apply(homes, lost)
    assert counts(homes, [None, "b"]) == [3, 3]
    # a rejoins: it takes one from each, not only from the leader.
    rejoin = placement.spread(homes, [None, "b", "a"])
    assert sorted(homes[r] or "leader" for r in rejoin) == ["b", "leader"]
    assert counts(apply(homes, rejoin), [None, "b", "a"]) == [2, 2, 2]


def test_a_lost_members_shards_come_back_to_the_leader_when_it_is_alone():
    homes = {"coalescer:0": None, "coalescer:1": "b", "coalescer:2": "c", "coalescer:3": "b"}
    assert placement.spread(homes, [None]) == {"coalescer:1": None, "coalescer:2": None, "coalescer:3": None}
    assert placement.spread(homes, [None, "b", "c"]) == {}


@pytest.mark.parametrize("seed", range(60))
def test_any_joins_and_losses_keep_the_spread_even_with_the_fewest_moves(seed):
    """Members join and are lost at random (the Supervisor calls `spread` after each):
    every shard is on a live host, every host holds shards // hosts or one more, and no
    placement moves fewer of the shards that run on live hosts."""
    rng = random.Random(seed)
    count = rng.randint(1, 16)
    homes = shards(count)
    hosts: list[str | None] = [None]
    for step in range(40):
        if len(hosts) > 1 and rng.random() < 0.4:
            hosts.remove(rng.choice(hosts[1:]))
        else:
            hosts.append(f"m{step}")
        moves = placement.spread(homes, hosts)
        gone = {r for r, h in homes.items() if h not in hosts}
        assert gone <= set(moves), "every shard of a lost host is placed"
        assert all(moves[r] != homes[r] for r in moves), "a move goes somewhere else"
        assert len(set(moves) - gone) == fewest_moves(homes, hosts)
        homes = apply(homes, moves)
        assert sorted(homes) == sorted(shards(count)), "the shard count never changes"
        assert all(h in hosts for h in homes.values()), "every shard on a live host"
        assert even(homes, hosts), counts(homes, hosts)
        assert placement.spread(homes, hosts) == {}, "an even spread stays as it is"


@pytest.mark.parametrize("count", range(1, 6))
def test_no_placement_moves_fewer_shards_than_spread(count):
    """Every placement of `count` shards over a leader, two members and a gone host,
    against every even placement over the live three: `spread` moves the fewest."""
    hosts = [None, "b", "c"]
    for placed in itertools.product([None, "b", "c", "gone"], repeat=count):
        homes = dict(zip(shards(count), placed))
        moves = placement.spread(homes, hosts)
        after = apply(homes, moves)
        assert even(after, hosts)
        best = min(
            sum(1 for (r, h), new in zip(homes.items(), candidate) if h != "gone" and new != h)
            for candidate in itertools.product(hosts, repeat=count)
            if even(dict(zip(shards(count), candidate)), hosts)
        )
        assert len([r for r in moves if homes[r] != "gone"]) == best, homes
