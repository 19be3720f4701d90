"""The Coalescer actor: hosts CoalescerLogic for one key shard (role "coalescer:<n>").

A shard may move to another host when a member joins the cluster (actors/placement.py):
its part in the move (finish its flights, then stop; or pass Cancels to the actor it
replaced) is actors/shard_handoff.py.
"""

from __future__ import annotations

from thespian.actors import ActorExitRequest

from actors import placement, secret
from actors.coalescer_logic import CoalescerLogic
from actors.host import HostActor, my_address
from actors.shard_handoff import GraceOver, ShardHandoff
from protocols import messages as m
from protocols import roles
from protocols.effects import Send
from protocols.settings import CoalescerFlags


class CoalescerActor(HostActor):
    role = roles.COALESCER
    actorSystemCapabilityCheck = staticmethod(placement.on_host)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logic: CoalescerLogic | None = None
        self.handoff: ShardHandoff | None = None

    def on_wire(self, wire: m.Wire) -> None:
        self.role = wire.role
        if self.logic is None:
            s = self.settings
            flags = CoalescerFlags(s.coalesce_enabled, s.stream_fanout_enabled, s.coalesce_error_ttl_s)
            self.logic = CoalescerLogic(me=my_address(self), secret=secret.get(), flags=flags)
            self.handoff = ShardHandoff(my_address(self))

    def on_message(self, msg, sender, now):
        if self.logic is None or self.handoff is None:
            return [Send(sender, m.ErrorReply("not_ready", "coalescer not wired yet"))] if sender else []
        if isinstance(msg, m.Admin):
            return self._admin(msg, sender, now)
        if isinstance(msg, m.ShardMoved):
            effects = self.handoff.moved(msg)
            if self.handoff.successor:  # moving away: its lease slices go back to their Pacers
                effects += self.logic.slices.close()
            return effects
        if isinstance(msg, GraceOver):
            self.handoff.grace_over = True
        else:
            passed = self.handoff.passes_on(msg, self.logic)
            self.apply(passed if passed is not None else self.logic.handle(msg, sender, now))
        if self.handoff.done(self.logic):
            self.send(self.myAddress, ActorExitRequest())
        return []

    def state(self, now: float) -> dict:
        if not self.logic:
            return {"wired": False}
        moved = {"moved_to": self.handoff.successor} if self.handoff and self.handoff.successor else {}
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
