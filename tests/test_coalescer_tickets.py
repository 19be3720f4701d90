"""Every `Admitted` the Coalescer sends carries the hub ticket for the edge that submitted
(leader, followers on other edges, an error replayed within its TTL), and stream ids are
random, not derived from the request id the client sees. CoalescerLogic driven directly."""

from __future__ import annotations

import pytest

from actors.coalescer_logic import CoalescerLogic
from protocols import auth, stream_ids
from protocols import messages as m

pytestmark = pytest.mark.unit

SECRET = auth.new_secret()
KEY = "cd" * 32


def submit(request_id: str, edge_id: str) -> m.Submit:
    return m.Submit(request_id, KEY, "simulated", "sim-1", {"messages": []}, edge_id, 0.0)


def admitted(effects) -> list[m.Admitted]:
    return [e.msg for e in effects if isinstance(e.msg, m.Admitted)]


def test_each_admitted_edge_gets_its_own_ticket_and_no_other():
    logic = CoalescerLogic(me="coalescer:0", secret=SECRET)
    out = logic.handle(submit("r-leader", "edge-a"), "edge:a", 0.0)
    stream_id = out[0].msg.lease_id
    out += logic.handle(submit("r-follower", "edge-b"), "edge:b", 0.0)  # waits for the lease
    answers = admitted(logic.handle(m.LeaseGranted(stream_id, 0.0), "pacer", 0.0))
    answers += admitted(logic.handle(submit("r-late", "edge-c"), "edge:c", 0.1))  # streaming: at once

    by_request = {a.request_id: a for a in answers}
    assert set(by_request) == {"r-leader", "r-follower", "r-late"}
    for request_id, edge_id in (("r-leader", "edge-a"), ("r-follower", "edge-b"), ("r-late", "edge-c")):
        ticket = by_request[request_id].ticket
        assert auth.ticket_ok(SECRET, stream_id, edge_id, ticket)
        assert not any(
            auth.ticket_ok(SECRET, stream_id, other, ticket) for other in {"edge-a", "edge-b", "edge-c"} - {edge_id}
        )
    # 128 random bits, then the tag of the shard that owns it (protocols/stream_ids.py)
    random_part, _, tag = stream_id.partition("~")
    assert "r-leader" not in stream_id and len(random_part) == len("s-") + 32
    assert tag == stream_ids.owner_tag(SECRET, "coalescer:0")


def test_an_error_replayed_within_its_ttl_carries_the_new_edges_ticket():
    logic = CoalescerLogic(me="coalescer:0", secret=SECRET)
    stream_id = logic.handle(submit("r-1", "edge-a"), "edge:a", 0.0)[0].msg.lease_id
    logic.handle(m.LeaseGranted(stream_id, 0.0), "pacer", 0.0)
    logic.handle(
        m.StreamFinished(stream_id, "error", {"type": "error", "code": "upstream_error", "message": "x"}), "pool", 1.0
    )
    [replay] = admitted(logic.handle(submit("r-2", "edge-b"), "edge:b", 1.5))
    assert replay.error is not None and replay.stream_id == stream_id
    assert auth.ticket_ok(SECRET, stream_id, "edge-b", replay.ticket)


def test_stream_ids_differ_for_the_same_request_id():
    ids = {
        CoalescerLogic(secret=SECRET).handle(submit("r-same", "edge-a"), "edge:a", 0.0)[0].msg.lease_id
        for _ in range(3)
    }
    assert len(ids) == 3
