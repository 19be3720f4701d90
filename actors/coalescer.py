"""The Coalescer actor: hosts CoalescerLogic for one key shard (role "coalescer:<n>")."""

from __future__ import annotations

from actors import secret
from actors.coalescer_logic import CoalescerLogic
from actors.host import HostActor, my_address
from protocols import messages as m
from protocols import roles
from protocols.effects import Send
from protocols.settings import CoalescerFlags


class CoalescerActor(HostActor):
    role = roles.COALESCER

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logic: CoalescerLogic | None = None

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
        return self.logic.handle(msg, sender, now)

    def state(self, now: float) -> dict:
        return self.logic.state(now) if self.logic else {"wired": False}

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
