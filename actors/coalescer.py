"""The Coalescer actor: hosts CoalescerLogic for one key shard (role "coalescer:<n>").

A shard may move to another host when a member joins the cluster (actors/placement.py,
docs/scale-out.md): the Supervisor points the role at a new actor there and tells both
(`ShardMoved`). The old one keeps serving the flights it holds (the Pacer and the Pools
answer it by address) and any Submit an edge with a not yet refreshed directory still
sends it, then stops once it holds no flight and the edges' directories are fresh. The
new one passes a Cancel for a stream it does not know to the old one: an edge cancels by
role, and the old one admitted that stream.
"""

from __future__ import annotations

from thespian.actors import ActorExitRequest

from actors import placement, secret
from actors.coalescer_logic import CoalescerLogic
from actors.host import HostActor, my_address
from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send
from protocols.settings import CoalescerFlags

# Edges refresh their directory every second (edge/bridge.py DIRECTORY_TTL_S): a moved
# shard's old actor answers what they still send it for this long, even with no flight.
HANDOFF_GRACE_S = 3.0


class GraceOver:
    """Timer: the edges' directories name the moved shard's new actor by now."""


class CoalescerActor(HostActor):
    role = roles.COALESCER
    actorSystemCapabilityCheck = staticmethod(placement.on_host)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logic: CoalescerLogic | None = None
        self.successor = ""  # set when this shard moved away: it stops once idle
        self.grace_over = False
        self.predecessor = ""  # the old actor of a shard that moved here, while it runs

    def on_wire(self, wire: m.Wire) -> None:
        self.role = wire.role
        if self.logic is None:
            s = self.settings
            flags = CoalescerFlags(s.coalesce_enabled, s.stream_fanout_enabled, s.coalesce_error_ttl_s)
            self.logic = CoalescerLogic(me=my_address(self), secret=secret.get(), flags=flags)

    def on_message(self, msg, sender, now):
        if self.logic is None:
            return [Send(sender, m.ErrorReply("not_ready", "coalescer not wired yet"))] if sender else []
        if isinstance(msg, m.Admin):
            return self._admin(msg, sender, now)
        if isinstance(msg, m.ShardMoved):
            return self._moved(msg)
        if isinstance(msg, GraceOver):
            self.grace_over = True
        elif isinstance(msg, m.Cancel) and self.predecessor and msg.stream_id not in self.logic.by_stream:
            return [Send(self.predecessor, msg)]
        else:
            effects = self.logic.handle(msg, sender, now)
            if not self.successor:
                return effects
            self.apply(effects)
        if self.successor and self.grace_over and not self.logic.by_stream:
            self.send(self.myAddress, ActorExitRequest())
        return []

    def _moved(self, msg: m.ShardMoved) -> list:
        me = my_address(self)
        if msg.predecessor == me and msg.successor != me:
            self.successor = msg.successor
            return [After(HANDOFF_GRACE_S, GraceOver())]
        if msg.successor == me:
            self.predecessor = msg.predecessor
        return []

    def state(self, now: float) -> dict:
        if not self.logic:
            return {"wired": False}
        moved = {"moved_to": self.successor} if self.successor else {}
        return {**self.logic.state(now), **moved}

    def _admin(self, msg: m.Admin, sender, now) -> list:
        if msg.command == "show":
            return [Send(sender, m.AdminResult(True, self.logic.state(now)))]
        if msg.command == "set_flags":
            try:
                self.logic.set_flags(msg.args)
            except ValueError as exc:
                return [Send(sender, m.AdminResult(False, self.logic.state(now), str(exc)))]
            return [Send(sender, m.AdminResult(True, self.logic.state(now)))]
        return [Send(sender, m.AdminResult(False, {}, f"coalescer: unknown command {msg.command!r} (show, set_flags)"))]
