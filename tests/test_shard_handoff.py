"""A Coalescer shard's part in moving to another host (actors/shard_handoff.py): the old
actor finishes its flights and then may stop; the new one passes Cancels of the streams
the old one admitted back to it. The real move is tests/test_scale_out.py."""

from __future__ import annotations

import pytest

from actors.coalescer_logic import CoalescerLogic
from actors.shard_handoff import HANDOFF_GRACE_S, GraceOver, ShardHandoff
from protocols import messages as m
from protocols.effects import After, Send

pytestmark = pytest.mark.unit

OLD, NEW = "10.0.0.1:4001", "10.0.0.2:4002"


def with_flight() -> CoalescerLogic:
    logic = CoalescerLogic(me=OLD, secret=b"s" * 32, new_stream_id=lambda: "s-1")
    logic.handle(m.Submit("r-1", "k", "simulated", "m", {}, "e-1", 0.0), "edge", 0.0)
    assert "s-1" in logic.by_stream
    return logic


def test_the_old_actor_stops_only_after_the_grace_and_its_last_flight():
    old, logic = ShardHandoff(OLD), with_flight()
    assert old.moved(m.ShardMoved("coalescer:1", OLD, NEW)) == [After(HANDOFF_GRACE_S, GraceOver())]
    assert not old.done(logic), "the grace is not over"
    old.grace_over = True
    assert not old.done(logic), "it still holds a flight"
    logic.handle(m.StreamFinished("s-1", "done", None, "pool"), "pool", 1.0)
    assert old.done(logic)
    # It handles everything itself: it passes nothing on.
    assert old.passes_on(m.Cancel("s-9", "e-1", 1.0), logic) is None


def test_an_actor_that_never_moved_never_stops():
    actor = ShardHandoff(OLD)
    actor.grace_over = True
    assert not actor.done(CoalescerLogic(me=OLD))


def test_the_new_actor_passes_on_a_cancel_of_a_stream_it_does_not_know():
    new, logic = ShardHandoff(NEW), with_flight()  # its own flight "s-1"
    assert new.moved(m.ShardMoved("coalescer:1", OLD, NEW)) == []
    cancel = m.Cancel("s-old", "e-1", 2.0)
    assert new.passes_on(cancel, logic) == [Send(OLD, cancel)]
    assert new.passes_on(m.Cancel("s-1", "e-1", 2.0), logic) is None, "its own stream: it cancels it"
    assert new.passes_on(m.Submit("r-2", "k2", "simulated", "m", {}, "e-1", 2.0), logic) is None
    assert not new.done(logic), "the new actor never stops on its own"
    # The old one stopped: nothing is passed on any more.
    new.moved(m.ShardMoved("coalescer:1", "", NEW))
    assert new.passes_on(cancel, logic) is None


def test_a_move_of_another_actor_changes_nothing():
    other = ShardHandoff("10.0.0.3:4003")
    assert other.moved(m.ShardMoved("coalescer:1", OLD, NEW)) == []
    assert other.successor == other.predecessor == ""
