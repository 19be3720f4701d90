"""Role names (protocols/roles.py): built and parsed in one place, round trips, bad names."""

from __future__ import annotations

import pytest

from actors.supervisor import child_roles
from protocols import config, roles

pytestmark = pytest.mark.unit


def test_builders_make_the_names_the_directory_uses():
    assert roles.pacer("PERPLEXITY") == roles.pacer("perplexity") == "pacer:perplexity"
    assert roles.pacer_for("perplexity_sonar") == roles.pacer_for("perplexity") == "pacer:perplexity"
    assert roles.pacer_for("openai_responses") == "pacer:openai"
    assert roles.coalescer(0) == "coalescer:0" and roles.coalescer(12) == "coalescer:12"


@pytest.mark.parametrize("name", ["supervisor", "pool", "metrics", "threads", "pacer:simulated", "coalescer:3"])
def test_parse_and_str_round_trip(name):
    assert str(roles.parse(name)) == name


def test_parse_reads_the_parts_back():
    assert roles.parse(roles.pacer("OpenAI")) == roles.Role("pacer", "openai")
    assert roles.pacer_account(roles.pacer_for("anthropic")) == "anthropic"
    assert roles.coalescer_shard(roles.coalescer(7)) == 7
    assert roles.parse("pool") == roles.Role("pool") and roles.kind("coalescer:1") == "coalescer"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "pacer",
        "pacer:",
        "pacer:OpenAI",
        "pacer:a:b",
        "pacer: x",
        "coalescer",
        "coalescer:",
        "coalescer:-1",
        "coalescer:01",
        "coalescer:x",
        "coalescer:١",
        "pool:0",
        "pool:01",
        "pool:",
        "supervisor:",
        "edge:e1",
        "127.0.0.1:19500",
        None,
        3,
    ],
)
def test_parse_refuses_what_is_not_a_role(bad):
    with pytest.raises(ValueError, match="not a role"):
        roles.parse(bad)


def test_builders_refuse_bad_parts():
    for bad in ("", "  ", "a:b"):
        with pytest.raises(ValueError):
            roles.pacer(bad)
    for shard in (-1, True, "1", 1.0):
        with pytest.raises(ValueError):
            roles.coalescer(shard)
    with pytest.raises(KeyError):
        roles.pacer_for("no-such-provider")
    with pytest.raises(ValueError, match="not a pacer role"):
        roles.pacer_account("coalescer:0")
    with pytest.raises(ValueError, match="not a coalescer role"):
        roles.coalescer_shard("pacer:openai")


def test_predicates_answer_for_any_string():
    assert roles.is_pacer("pacer:openai") and not roles.is_pacer("pool") and not roles.is_pacer("127.0.0.1:1")
    assert roles.is_coalescer("coalescer:0") and not roles.is_coalescer("pacer:openai")


def test_the_supervisors_children_are_one_pacer_per_account_and_one_coalescer_per_shard():
    settings = config.load(
        {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:1", "COALESCER_SHARDS": "3", "SLUICE_POOLS": "1"}
    )
    names = roles.children(settings.providers, settings.coalescer_shards)
    # openai and openai_responses bill to one account: one Pacer
    assert names == [
        "metrics",
        "pool",
        "threads",
        "pacer:simulated",
        "pacer:openai",
        "coalescer:0",
        "coalescer:1",
        "coalescer:2",
    ]
    assert all(str(roles.parse(n)) == n for n in names)
    actors = child_roles(settings)
    assert list(actors) == names
    assert {roles.kind(n): cls.__name__ for n, cls in actors.items()} == {
        "metrics": "MetricsActor",
        "pool": "PoolActor",
        "threads": "ThreadStoreActor",
        "pacer": "PacerActor",
        "coalescer": "CoalescerActor",
    }


def test_pool_roles_keep_pool_zero_named_pool():
    assert roles.pools(1) == ["pool"] and roles.pools(3) == ["pool", "pool:1", "pool:2"]
    assert [roles.pool_index(r) for r in roles.pools(3)] == [0, 1, 2]
    assert roles.parse("pool:2") == roles.Role("pool", "2") and str(roles.parse("pool:2")) == "pool:2"
    assert roles.is_pool("pool") and roles.is_pool("pool:1") and not roles.is_pool("pool:0")
    assert not roles.is_pool("pacer:openai") and not roles.is_pool("127.0.0.1:1") and not roles.is_pool(None)
    with pytest.raises(ValueError):
        roles.pool(-1)
    with pytest.raises(ValueError):
        roles.pool_index("metrics")


def test_the_supervisor_creates_every_pool():
    settings = config.load({"SLUICE_POOLS": "3", "COALESCER_SHARDS": "1"})
    assert roles.children(settings.providers, 1, settings.pools) == [
        "metrics",
        "pool",
        "pool:1",
        "pool:2",
        "threads",
        "pacer:simulated",
        "coalescer:0",
    ]
    assert {n: cls.__name__ for n, cls in child_roles(settings).items() if roles.is_pool(n)} == {
        "pool": "PoolActor",
        "pool:1": "PoolActor",
        "pool:2": "PoolActor",
    }


@pytest.mark.parametrize(("cores", "pools"), [(None, 1), (1, 1), (2, 1), (4, 1), (8, 2), (16, 4), (64, 16)])
def test_default_pools_one_per_four_cores(cores, pools):
    assert config.default_pools(cores) == pools


@pytest.mark.parametrize(
    ("workers", "clustered", "shards"), [(1, False, 1), (2, False, 2), (8, False, 2), (1, True, 2)]
)
def test_default_shards_follow_the_edge_workers_and_the_cluster(workers, clustered, shards):
    assert config.default_shards(workers, clustered) == shards


def test_a_host_of_a_cluster_defaults_to_two_shards_and_a_set_count_wins():
    base = {"SIMULATED_BASE_URL": "http://127.0.0.1:1"}
    secret = "s" * 32
    assert config.load(base).coalescer_shards == 1
    assert config.load({**base, "SLUICE_WORKERS": "3"}).coalescer_shards == 2
    assert config.load({**base, "SLUICE_CLUSTER_SECRET": secret}).coalescer_shards == 2  # members may join it
    joining = {**base, "SLUICE_CLUSTER_SECRET": secret, "SLUICE_JOIN": "127.0.0.2:19500"}
    assert config.load(joining).coalescer_shards == 2
    assert config.load({**base, "SLUICE_WORKERS": "4", "COALESCER_SHARDS": "3"}).coalescer_shards == 3
