"""The thin Thespian host every sluice actor is: decode, hand to logic, carry out effects.

Why a host and a logic class: the logic is a plain class (state + `handle(msg, sender,
now)` -> effects) that the simulation harness drives on a virtual clock; the host is the
only place that knows about Thespian. The host never lets an exception reach Thespian,
which would redeliver the message (2-3 times) and then declare it poison: a message that
fails to decode or to handle gets an `ErrorReply` instead. So does a `Wire` whose settings
do not fit `Settings` (protocols/gateway_settings.py `from_wire`): the actor keeps the
settings and directory it had. `self.settings` is built once per `Wire`, here.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

from thespian.actors import Actor, ActorAddress, ActorSystemMessage, WakeupMessage

from actors import addressing, placement
from protocols import messages as m
from protocols import roles, trace
from protocols.effects import After, Send
from protocols.gateway_settings import Settings, SettingsError

log = logging.getLogger("sluice.actors")


class Timer:
    """Payload of a Thespian wakeup: a message for this actor's own logic (never sent)."""

    __slots__ = ("msg",)

    def __init__(self, msg: Any):
        self.msg = msg


class HostActor(Actor):
    """Base of every sluice actor. Subclasses implement `on_message(msg, sender, now)`
    returning effects, and may override `on_wire`, `on_system`."""

    role = "actor"

    # Where Thespian may create it in a Convention of several hosts: on the leader, unless
    # a subclass says otherwise (actors/placement.py).
    actorSystemCapabilityCheck = staticmethod(placement.leader_only)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.directory: dict[str, str] = {}
        self.settings: Settings | None = None  # from the first Wire on

    # --- Thespian entry point -----------------------------------------------------------
    def receiveMessage(self, msg, sender):
        try:
            if isinstance(msg, (bytes, bytearray)):
                self._on_bytes(bytes(msg), sender)
            elif isinstance(msg, WakeupMessage):
                if isinstance(msg.payload, Timer):
                    self.apply(self.on_message(msg.payload.msg, None, time.time()))
            elif isinstance(msg, ActorSystemMessage):
                self.on_system(msg, sender)
            elif isinstance(sender, ActorAddress):  # a Python object: not one of our messages
                self.send(
                    sender, m.encode(m.ErrorReply("bad_message", f"expected msgpack bytes, got {type(msg).__name__}"))
                )
        except Exception as exc:  # never let Thespian redeliver
            log.exception("%s failed handling %s", self.role, type(msg).__name__)
            if isinstance(msg, (bytes, bytearray)) and isinstance(sender, ActorAddress):
                self.send(sender, m.encode(m.ErrorReply("internal_error", f"{self.role}: {exc}")))
        return self.watch()

    def _on_bytes(self, data: bytes, sender) -> None:
        msg = m.decode(data)
        trace.stamp("actor_recv", self.role, msg)
        if isinstance(msg, m.Invalid):
            self.send(sender, m.encode(m.ErrorReply("bad_message", msg.reason)))
            return
        if isinstance(msg, m.Wire):
            try:
                settings = Settings.from_wire(msg.settings)
            except SettingsError as exc:  # nothing changes: the actor runs on as it was
                log.warning("%s: refused a Wire: %s", self.role, exc)
                self.send(sender, m.encode(m.ErrorReply("bad_message", f"wire: {exc}")))
                return
            before = self.directory.get(roles.SUPERVISOR)
            adopted_from = self.directory if before not in (None, msg.directory.get(roles.SUPERVISOR)) else None
            self.directory = dict(msg.directory)
            self.settings = settings
            self.on_wire(msg)
            if msg.role != roles.SUPERVISOR:
                self.send(sender, m.encode(m.Ready(msg.role, my_address(self), os.getpid(), adopted_from)))
            return
        if isinstance(msg, m.GetState):  # every actor answers it: readiness, admin "show"
            self.send(sender, m.encode(m.State(self.role, {"pid": os.getpid(), **self.state(time.time())})))
            return
        self.apply(self.on_message(msg, sender, time.time()))

    # --- carrying out effects -----------------------------------------------------------
    def apply(self, effects) -> None:
        for effect in effects or ():
            if isinstance(effect, Send):
                target = self.resolve(effect.to)
                if target is None:
                    log.warning("%s: no address for %r, dropped %s", self.role, effect.to, type(effect.msg).__name__)
                    continue
                trace.stamp("actor_send", self.role, effect.msg)
                self.send(target, m.encode(effect.msg))
            elif isinstance(effect, After):
                self.wakeupAfter(timedelta(seconds=max(0.0, effect.delay_s)), payload=Timer(effect.msg))

    def resolve(self, to) -> ActorAddress | None:
        if isinstance(to, ActorAddress):
            return to
        if isinstance(to, str):
            if to in self.directory:
                return addressing.from_string(self.directory[to])
            if ":" in to and to.rpartition(":")[2].isdigit() and not _is_role(to):
                return addressing.from_string(to)
        return None

    # --- hooks ------------------------------------------------------------------------------
    def on_message(self, msg, sender, now: float) -> list:
        return []

    def on_wire(self, wire: m.Wire) -> None:
        pass

    def state(self, now: float) -> dict:
        """What GetState and the admin "show" command report (plus the pid)."""
        return {}

    def on_system(self, msg, sender) -> None:
        pass

    def watch(self):
        return None


def _is_role(text: str) -> bool:
    """ "pool:3" is a role (gone from the directory: its host left), not host "pool" port 3."""
    try:
        roles.parse(text)
    except ValueError:
        return False
    return True


def my_address(actor: Actor) -> str:
    return addressing.to_string(actor.myAddress)
