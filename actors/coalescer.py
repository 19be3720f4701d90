"""The Coalescer actor: hosts CoalescerLogic for one key shard (role "coalescer:<n>")."""
from __future__ import annotations

from actors import secret
from actors.coalescer_logic import CoalescerFlags, CoalescerLogic
from actors.effects import Send
from actors.host import HostActor, my_address
from protocols import messages as m
from protocols import roles

FLAG_TYPES = {"coalesce_enabled": bool, "stream_fanout_enabled": bool, "error_ttl_s": float}


def flags_from(base: CoalescerFlags, changes: dict) -> CoalescerFlags:
    """Apply admin changes; ValueError names the bad key or value (state unchanged)."""
    values = {}
    for key, value in changes.items():
        kind = FLAG_TYPES.get(key)
        if kind is None:
            raise ValueError(f"unknown coalescer flag {key!r} (known: {sorted(FLAG_TYPES)})")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        values[key] = kind(value)
    merged = {**base.__dict__, **values}
    return CoalescerFlags(**merged)


class CoalescerActor(HostActor):
    role = roles.COALESCER

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logic: CoalescerLogic | None = None

    def on_wire(self, wire: m.Wire) -> None:
        self.role = wire.role
        if self.logic is None:
            s = wire.settings
            flags = CoalescerFlags(s["COALESCE_ENABLED"], s["STREAM_FANOUT_ENABLED"], s["COALESCE_ERROR_TTL_S"])
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
                self.logic.flags = flags_from(self.logic.flags, msg.args)
            except ValueError as exc:
                return [Send(sender, m.AdminResult(False, self.logic.state(now), str(exc)))]
            return [Send(sender, m.AdminResult(True, self.logic.state(now)))]
        return [Send(sender, m.AdminResult(False, {}, f"coalescer: unknown command {msg.command!r} (show, set_flags)"))]
