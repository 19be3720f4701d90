"""A dead Coalescer shard's unopened streams end at the hub (actors/hub_logic.py `owner_lost`):
stream ids name the shard incarnation that owns the flight (protocols/stream_ids.py), so the
Pool, told of the shard's death, ends the streams nobody alive would open (the Pacer they
were queued at may have died with the shard: docs/reliability.md, "Process crashes")."""

from __future__ import annotations

import hashlib

import pytest

from actors import hub_logic
from actors.coalescer_logic import CoalescerLogic
from actors.hub_logic import HubLogic
from actors.pacer_logic import PacerLogic, PacerSettings
from actors.pool_logic import PoolLogic, Publish, Start
from protocols import auth, stream_ids
from protocols import events as ev
from protocols import messages as m
from protocols.effects import Send

pytestmark = pytest.mark.unit

SECRET = b"test secret"
DEAD = "127.0.0.1:40001"  # the dead shard incarnation's address
ALIVE = "127.0.0.1:40002"


def subscribe(hub: HubLogic, stream_id: str, peer: str = "edge-1", now: float = 0.0) -> list:
    return hub.handle(m.Subscribe(stream_id, auth.ticket(SECRET, stream_id, peer)), peer, peer, now)


def frames(sends: list) -> dict[str, list]:
    """stream id -> the events of its frame (every subscriber gets the same frame)."""
    return {send.msg.stream_id: send.msg.events for send in sends}


def test_a_dead_shards_unopened_streams_end_with_coalescer_lost_and_nothing_else_does():
    hub = HubLogic(SECRET)
    queued = stream_ids.new(SECRET, DEAD)  # queued at a Pacer: subscribed to, never opened
    running = stream_ids.new(SECRET, DEAD)  # its call runs here: served to the end
    other = stream_ids.new(SECRET, ALIVE)  # another shard's, queued
    untagged = auth.unguessable_id("s-")  # an older shard's id: no owner known here
    for sid in (queued, running, other, untagged):
        subscribe(hub, sid, "edge-1")
    subscribe(hub, queued, "edge-2")
    hub.mark_open(running, 0.0)
    hub.publish(running, [ev.delta("a")], 0.1)

    sent = hub.owner_lost("coalescer:0", DEAD, 1.0)

    assert {(s.to, s.msg.stream_id) for s in sent} == {("edge-1", queued), ("edge-2", queued)}
    (error,) = frames(sent)[queued]
    assert error["type"] == ev.ERROR and error["code"] == "coalescer_lost" and "coalescer:0" in error["message"]
    assert hub.is_finished(queued)
    assert not hub.is_finished(running) and not hub.is_finished(other) and not hub.is_finished(untagged)
    assert hub.publish(running, [ev.delta("b")], 1.1), "the running call's stream goes on"
    assert hub.owner_lost("coalescer:0", DEAD, 2.0) == [], "told twice: nothing ends twice"


def test_a_subscribe_after_the_loss_gets_the_error_at_once():
    # The dead shard's Admitted crossed its death: the edge subscribes afterwards.
    hub = HubLogic(SECRET)
    hub.owner_lost("coalescer:1", DEAD, 1.0)
    late = stream_ids.new(SECRET, DEAD)
    sent = subscribe(hub, late, "edge-1", now=1.5)
    assert [(s.to, [e["code"] for e in s.msg.events]) for s in sent] == [("edge-1", ["coalescer_lost"])]
    assert subscribe(hub, stream_ids.new(SECRET, ALIVE), "edge-1", now=1.5) == [], (
        "another shard's stream waits as before"
    )
    # a second subscriber of the ended stream gets the replay (the error), as for any finished stream
    again = subscribe(hub, late, "edge-2", now=1.6)
    assert [[e["code"] for e in s.msg.events] for s in again] == [["coalescer_lost"]]


def test_a_dead_shard_is_forgotten_after_a_minute_so_a_reused_address_is_not_taken_for_it():
    # Ports wrap around: a later shard incarnation may get the dead one's address.
    hub = HubLogic(SECRET)
    hub.owner_lost("coalescer:0", DEAD, 1.0)
    reborn = stream_ids.new(SECRET, DEAD)
    assert subscribe(hub, reborn, now=1.0 + hub_logic.LOST_OWNER_KEPT_S + 0.1) == []
    assert not hub.is_finished(reborn), "its stream waits for its lease as any other"
    hub.owner_lost("coalescer:1", ALIVE, 100.0)  # the next loss drops what has expired
    assert list(hub.lost_owners) == [stream_ids.owner_tag(SECRET, ALIVE)]


def test_a_grant_that_arrives_after_the_loss_goes_straight_back():
    # The dead Pacer's OpenStream, or a live Pacer's sent before it heard of the death.
    hub = HubLogic(SECRET)
    pool = PoolLogic("pool", hub)
    sid = stream_ids.new(SECRET, DEAD)
    subscribe(hub, sid)
    hub.owner_lost("coalescer:0", DEAD, 1.0)
    effects = pool.handle(m.OpenStream(sid, "simulated", "sim-1", {}, sid, 0.0, DEAD), 1.2)
    assert not [e for e in effects if isinstance(e, (Start, Publish))], "no call runs for it"
    assert [type(e.msg) for e in effects if isinstance(e, Send)] == [m.LeaseRelease, m.StreamFinished]


def test_the_hub_remembers_a_bounded_number_of_dead_shards(monkeypatch):
    monkeypatch.setattr(hub_logic, "LOST_OWNERS_KEPT", 3)
    hub = HubLogic(SECRET)
    for n in range(5):
        hub.owner_lost("coalescer:0", f"127.0.0.1:{41000 + n}", float(n))
    assert len(hub.lost_owners) == 3 and hub.state()["lost_owners"] == 3
    assert stream_ids.owner_tag(SECRET, "127.0.0.1:41004") in hub.lost_owners
    assert stream_ids.owner_tag(SECRET, "127.0.0.1:41000") not in hub.lost_owners


def test_stream_ids_are_unguessable_and_name_their_owner():
    a, b = stream_ids.new(SECRET, DEAD), stream_ids.new(SECRET, DEAD)
    assert a != b and a.startswith("s-")
    assert (
        stream_ids.tag_of(a)
        == stream_ids.tag_of(b)
        == stream_ids.owner_tag(SECRET, DEAD)
        != stream_ids.owner_tag(SECRET, ALIVE)
    )
    assert DEAD not in a, "no internal address reaches a client (the meta event carries the id)"
    assert stream_ids.tag_of(auth.unguessable_id("s-")) is None
    assert stream_ids.tag_of("s-1~not-a-tag") is None


def test_a_shards_new_flights_carry_its_own_tag():
    shard = CoalescerLogic(me=DEAD, secret=SECRET)
    out = shard.handle(m.Submit("r-1", "k", "simulated", "sim-1", {}, "edge-1", 0.0), "edge", 0.0)
    (request,) = [s.msg for s in out if isinstance(s.msg, m.LeaseRequest)]
    assert stream_ids.tag_of(request.lease_id) == stream_ids.owner_tag(SECRET, DEAD)


def test_a_lease_slice_grant_carries_the_tag_of_the_shard_it_is_handed_to():
    """A grant's id is the stream id of the call its shard opens with it: the Pacer makes it,
    tagged with the shard that asked (`LeaseRequest.coalescer`). If that shard dies after it
    admitted the clients but before its OpenStream left, with the Pacer dead too, the hub
    ends the stream for the shard's death as for any of its flights."""
    pacer = PacerLogic("simulated", PacerSettings(rps=100, burst=20, concurrency=20), slice_size=2, secret=SECRET)
    ask = [m.LeaseRequest(f"s-{i}~x", "simulated", 0.0, "sim-1", {}, DEAD) for i in range(2)]
    pacer.handle(ask[0], "shard", 0.0)
    out = pacer.handle(ask[1], "shard", 0.1)  # asked twice in a row: cut a slice
    (grant,) = [s.msg for s in out if isinstance(s.msg, m.SliceGrant)]
    assert len(grant.grants) == 2
    assert {stream_ids.tag_of(g[0]) for g in grant.grants} == {stream_ids.owner_tag(SECRET, DEAD)}
    assert len({g[0] for g in grant.grants}) == 2, "each grant its own stream id"

    shard = CoalescerLogic(me=DEAD, secret=SECRET)
    shard.handle(grant, "pacer", 0.1)
    out = shard.handle(m.Submit("r-1", "k", "simulated", "sim-1", {}, "edge-1", 0.2), "edge", 0.2)
    (admitted,) = [s.msg for s in out if isinstance(s.msg, m.Admitted)]
    assert admitted.stream_id in {g[0] for g in grant.grants}, "opened with a grant, no LeaseRequest"
    assert not [s for s in out if isinstance(s.msg, m.LeaseRequest)]

    # The OpenStream is lost with the shard; the edge subscribed with the Admitted's ticket.
    hub = HubLogic(SECRET)
    hub.handle(m.Subscribe(admitted.stream_id, admitted.ticket), "edge-1", "edge-1", 0.3)
    sent = hub.owner_lost("coalescer:0", DEAD, 1.0)
    assert [(s.to, [e["code"] for e in s.msg.events]) for s in sent] == [("edge-1", ["coalescer_lost"])]


def test_the_owner_tag_is_keyed_so_no_address_can_be_read_back_from_it():
    # A plain hash of host:port is undone by hashing every port; the cluster secret's MAC is not.
    tag = stream_ids.owner_tag(SECRET, DEAD)
    assert tag != hashlib.sha256(DEAD.encode()).hexdigest()[: stream_ids.TAG_CHARS]
    assert tag != stream_ids.owner_tag(b"another cluster's secret", DEAD)
