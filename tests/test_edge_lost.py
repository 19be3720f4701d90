"""A dead edge worker's references (`MemberLost(edge, edge_id)`, sent by run.py through the
Supervisor: edge/worker_set.py) go as if that edge had cancelled them: a call only it
listened to is aborted, one another edge still holds goes on. CoalescerLogic driven
directly."""

from __future__ import annotations

import pytest

from actors.coalescer_logic import CoalescerLogic
from protocols import auth, roles
from protocols import messages as m

pytestmark = pytest.mark.unit

SECRET = auth.new_secret()


def submit(request_id: str, edge_id: str, key: str) -> m.Submit:
    return m.Submit(request_id, key, "simulated", "sim-1", {"messages": []}, edge_id, 0.0)


def streaming(logic: CoalescerLogic, key: str, *edges: str) -> str:
    """A flight on `key`, granted, with one reference per edge in `edges`."""
    out = logic.handle(submit("r-0", edges[0], key), "edge", 0.0)
    stream_id = out[0].msg.lease_id
    logic.handle(m.LeaseGranted(stream_id, 0.0, "pool@1"), "pacer", 0.0)
    for i, edge in enumerate(edges[1:], 1):
        logic.handle(submit(f"r-{i}", edge, key), "edge", 0.0)
    return stream_id


def test_a_dead_edges_call_is_aborted_and_a_shared_one_goes_on():
    logic = CoalescerLogic(me="coalescer:0", secret=SECRET)
    alone = streaming(logic, "aa" * 32, "edge-dead", "edge-dead")  # two local clients on the dead edge
    shared = streaming(logic, "bb" * 32, "edge-dead", "edge-live")
    out = logic.handle(m.MemberLost(roles.EDGE, "edge-dead"), "supervisor", 1.0)
    assert [(e.to, type(e.msg).__name__, e.msg.stream_id) for e in out] == [(roles.POOL, "AbortStream", alone)]
    assert alone not in logic.by_stream
    assert dict(logic.by_stream[shared].refs) == {"edge-live": 1}
    # the live edge's last client leaving ends the shared call as usual
    out = logic.handle(m.Cancel(shared, "edge-live", 2.0), "edge", 2.0)
    assert [type(e.msg).__name__ for e in out] == ["AbortStream"]


def test_a_dead_edges_call_still_asking_gives_its_lease_back():
    logic = CoalescerLogic(me="coalescer:0", secret=SECRET)
    out = logic.handle(submit("r-0", "edge-dead", "cc" * 32), "edge", 0.0)
    stream_id = out[0].msg.lease_id
    out = logic.handle(m.MemberLost(roles.EDGE, "edge-dead"), "supervisor", 1.0)
    assert sorted(type(e.msg).__name__ for e in out) == ["FailStream", "LeaseCancel"]
    assert logic.by_stream == {} and logic.by_key == {}
    # a late grant finds nothing to admit (nobody is sent an Admitted)
    assert logic.handle(m.LeaseGranted(stream_id, 0.0, "pool@1"), "pacer", 2.0) == []


def test_an_unknown_edge_changes_nothing():
    logic = CoalescerLogic(me="coalescer:0", secret=SECRET)
    stream_id = streaming(logic, "dd" * 32, "edge-a")
    assert logic.handle(m.MemberLost(roles.EDGE, "edge-other"), "supervisor", 1.0) == []
    assert dict(logic.by_stream[stream_id].refs) == {"edge-a": 1}
