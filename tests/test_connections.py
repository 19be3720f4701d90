"""An account's calls spread over as many httpcore pools as they need (actors/connections.py):
httpcore 1.0 runs at most 100 streams on a connection and opens no second one to an origin."""

from __future__ import annotations

import pytest

from actors.connections import AccountConnections

pytestmark = pytest.mark.unit


def test_a_call_takes_the_least_busy_pool_and_a_new_pool_opens_only_when_all_are_full():
    made = []
    connections = AccountConnections(lambda: made.append(object()) or made[-1], calls_per_pool=2)
    with connections.lease() as a, connections.lease() as b:
        assert a is b and len(made) == 1  # one pool carries up to 2 calls
        with connections.lease() as c:
            assert c is not a and len(made) == 2  # the first is full: a second pool
            with connections.lease() as d:
                assert d is c  # the least busy one
            assert [connections.busy[id(p)] for p in made] == [2, 1]
    assert [connections.busy[id(p)] for p in made] == [0, 0]
    with connections.lease() as e:
        assert e is made[0] and len(made) == 2  # idle pools are reused, never multiplied


def test_a_call_that_fails_gives_its_place_back():
    connections = AccountConnections(object, calls_per_pool=1)
    with pytest.raises(RuntimeError), connections.lease():
        raise RuntimeError("the attempt failed")
    assert list(connections.busy.values()) == [0]


def test_a_retired_pool_is_handed_out_no_more_and_closed_once_its_calls_end():
    made = []
    connections = AccountConnections(lambda: made.append(object()) or made[-1], calls_per_pool=10)
    with connections.lease() as broken, connections.lease() as other:
        assert broken is other
        connections.retire(broken)
        with connections.lease() as fresh:
            assert fresh is not broken  # the retry gets a new pool, with a connection of its own
        assert connections.idle_retired() == []  # calls still finishing on the broken one
    assert connections.idle_retired() == [broken]
    assert connections.idle_retired() == []  # closed once
    with connections.lease() as again:
        assert again is made[1]
