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
from protocols import config

pytestmark = pytest.mark.unit

LEADER = placement.capabilities("10.0.0.1", 19500, None, 2)
MEMBER = placement.capabilities("10.0.0.2", 19500, "10.0.0.1:19500", 3)
LEADER_ONLY = (SupervisorActor, PacerActor, CoalescerActor, MetricsActor, ThreadStoreActor)


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


def test_a_pool_runs_where_its_requirements_say():
    on_member = {placement.HOST: MEMBER[placement.HOST]}
    assert PoolActor.actorSystemCapabilityCheck(MEMBER, on_member) is True
    assert PoolActor.actorSystemCapabilityCheck(LEADER, on_member) is False
    # The leader's own Pools name no host.
    assert PoolActor.actorSystemCapabilityCheck(LEADER, {}) is True
    assert PoolActor.actorSystemCapabilityCheck(MEMBER, {}) is False


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
