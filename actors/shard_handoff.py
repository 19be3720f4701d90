"""A Coalescer shard's part in moving to another host: plain code that the shard's actor
host (actors/coalescer.py) runs around its CoalescerLogic.

When a member joins, the Supervisor points some shard roles at new actors on it and tells
the old and the new actor of each (`ShardMoved(role, predecessor, successor)`;
docs/scale-out.md, "Coalescer shards over the hosts"):

- the old actor (the predecessor) keeps serving what it holds: the Pacer and the Pools
  answer its flights by address, and an edge whose directory is not refreshed yet still
  sends it a Submit. It stops once it holds no flight and `HANDOFF_GRACE_S` has passed
  (edges refresh their directory every second: edge/bridge.py `DIRECTORY_TTL_S`);
- the new actor (the successor) passes a `Cancel` for a stream it does not know to the old
  one: an edge cancels by role, and the old one admitted that stream. A `ShardMoved` with
  no predecessor (the old one stopped) ends that.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.coalescer_logic import CoalescerLogic
from protocols import messages as m
from protocols.effects import After, Send

HANDOFF_GRACE_S = 3.0


@dataclass(frozen=True)
class GraceOver:
    """Timer: the edges' directories name the moved shard's new actor by now."""


@dataclass
class ShardHandoff:
    """`me`: this actor's address string."""

    me: str
    successor: str = ""  # set when this actor's shard moved away: it stops once idle
    predecessor: str = ""  # the old actor of a shard that moved here, while it runs
    grace_over: bool = False

    def moved(self, msg: m.ShardMoved) -> list:
        if msg.predecessor == self.me and msg.successor != self.me:
            self.successor = msg.successor
            return [After(HANDOFF_GRACE_S, GraceOver())]
        if msg.successor == self.me:
            self.predecessor = msg.predecessor
        return []

    def passes_on(self, msg: object, logic: CoalescerLogic) -> list | None:
        """[Send to the predecessor] for a Cancel of a stream the predecessor admitted
        (one this actor does not know); None for anything this actor handles."""
        if isinstance(msg, m.Cancel) and self.predecessor and msg.stream_id not in logic.by_stream:
            return [Send(self.predecessor, msg)]
        return None

    def done(self, logic: CoalescerLogic) -> bool:
        """Whether this actor, whose shard moved away, may stop now."""
        return bool(self.successor) and self.grace_over and not logic.by_stream
