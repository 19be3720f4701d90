"""The Supervisor: creates every other actor, tells each who is where, recreates the dead.

Started by run.py under the global name `SUPERVISOR_NAME`, so any process that joins the
actor system (the edge, `run.py admin`) can find it and ask for the `Directory`.

It also watches run.py's process: if that dies without shutting the actor system down
(killed, crashed), the supervisor shuts the whole actor system down itself, so that no
actor process outlives the gateway.
"""
from __future__ import annotations

import hmac
import logging
import os
import subprocess
import sys

from thespian.actors import ActorExitRequest, ChildActorExited

from actors import addressing
from actors.coalescer import CoalescerActor
from actors.effects import After, Send
from actors.host import HostActor, my_address
from actors.system import alive
from actors.metrics import MetricsActor
from actors.pacer import PacerActor
from actors.pool import PoolActor
from actors.threads_store import ThreadStoreActor
from protocols import messages as m

log = logging.getLogger("sluice.supervisor")

SUPERVISOR_NAME = "sluice-supervisor"
WATCH_EVERY_S = 1.0


class Watch:
    """Timer: is run.py still alive? Are the children? (Thespian reaps one child per
    SIGCHLD, so of two actors dying together only one ChildActorExited may arrive.)"""


def child_roles(settings: dict) -> dict[str, type]:
    roles: dict[str, type] = {"metrics": MetricsActor, "pool": PoolActor, "threads": ThreadStoreActor}
    for provider in settings["providers"].values():
        roles[f"pacer:{provider['account'].lower()}"] = PacerActor
    for shard in range(settings["COALESCER_SHARDS"]):
        roles[f"coalescer:{shard}"] = CoalescerActor
    return roles


def redacted(settings: dict) -> dict:
    """Settings without provider keys, for every actor but the Pool."""
    providers = {name: {**p, "api_key": None} for name, p in settings["providers"].items()}
    return {**settings, "providers": providers, "SLUICE_ADMIN_TOKEN": None}


class SupervisorActor(HostActor):
    role = "supervisor"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.children: dict[str, object] = {}  # role -> ActorAddress
        self.addresses: dict[str, str] = {}  # role -> "host:port", once the child said Ready
        self.pids: dict[str, int] = {}
        self.hub: list = []
        self.generation = 0
        self.draining = False
        self.keys_reloads = 0  # reload-keys commands so far: each edge re-reads its keys file when it grows
        self.stopping = False

    def on_wire(self, wire: m.Wire) -> None:
        if self.children:
            return  # already running: a second Wire from run.py changes nothing
        for role, cls in child_roles(self.settings).items():
            self.children[role] = self.createActor(cls)
        self._wire_all()
        self.apply([After(WATCH_EVERY_S, Watch())])

    def _wire_all(self) -> None:
        """Tell every child who is where. A new child's real address is known only when
        it answers its first Wire with Ready; every change of address re-wires everyone."""
        self.generation += 1
        self.directory = {**self.addresses, "supervisor": my_address(self)}
        public = redacted(self.settings)
        for role, addr in self.children.items():
            settings = self.settings if role == "pool" else public
            self.send(addr, m.encode(m.Wire(role, self.directory, settings)))

    def _on_ready(self, msg: m.Ready) -> None:
        if msg.role not in self.children or self.addresses.get(msg.role) == msg.address:
            return
        self.addresses[msg.role] = msg.address
        self.pids[msg.role] = msg.pid
        if len(self.addresses) == len(self.children):
            self._wire_all()

    def on_message(self, msg, sender, now):
        if isinstance(msg, m.Ready):
            self._on_ready(msg)
            return []
        if isinstance(msg, m.HubReady):
            self.hub = [msg.host, msg.port]
            self.generation += 1
            return []
        if isinstance(msg, m.GetDirectory):
            return [Send(sender, self._directory())]
        if isinstance(msg, m.Admin):
            return self._admin(msg, sender)
        if isinstance(msg, m.AdminAuth):
            return [Send(sender, self._admin_auth(msg))]
        if isinstance(msg, Watch):
            return self._watch()
        return []

    def _directory(self) -> m.Directory:
        complete = len(self.addresses) == len(self.children) > 0
        hub = list(self.hub) if complete else []  # the edge waits for a hub: only offer a whole directory
        return m.Directory(dict(self.directory), hub, {"draining": self.draining, "keys_reloads": self.keys_reloads}, self.generation)

    def state(self, now: float) -> dict:
        return self._state()

    def _state(self) -> dict:
        return {
            "ready": bool(self.hub) and len(self.addresses) == len(self.children) > 0,
            "children": sorted(self.children),
            "generation": self.generation,
            "draining": self.draining,
            "keys_reloads": self.keys_reloads,
        }

    def _admin(self, msg: m.Admin, sender) -> list:
        if msg.command == "show":
            return [Send(sender, m.AdminResult(True, self._state()))]
        if msg.command == "drain":
            on = msg.args.get("on", True)
            if not isinstance(on, bool):
                return [Send(sender, m.AdminResult(False, self._state(), "drain: 'on' must be true or false"))]
            self.draining = on
            self.generation += 1
            return [Send(sender, m.AdminResult(True, self._state()))]
        if msg.command == "reload_keys":
            self.keys_reloads += 1
            self.generation += 1
            return [Send(sender, m.AdminResult(True, self._state()))]
        return [Send(sender, m.AdminResult(False, {}, f"supervisor: unknown command {msg.command!r} (show, drain, reload_keys)"))]

    def _admin_auth(self, msg: m.AdminAuth) -> m.AdminResult:
        """The admin CLI proves it holds the same token the HTTP admin routes ask for."""
        token = self.settings.get("SLUICE_ADMIN_TOKEN")
        if not token:
            return m.AdminResult(False, {"code": "admin_disabled"},
                                 "the gateway has no SLUICE_ADMIN_TOKEN: admin commands are off")
        presented = msg.token if isinstance(msg.token, str) else ""
        if not presented or not hmac.compare_digest(presented.encode(), token.encode()):
            return m.AdminResult(False, {"code": "unauthorized"}, "SLUICE_ADMIN_TOKEN is not the gateway's admin token")
        return m.AdminResult(True, {})

    def on_system(self, msg, sender) -> None:
        if isinstance(msg, ActorExitRequest):
            self.stopping = True
            return
        if isinstance(msg, ChildActorExited) and not self.stopping:
            exited = _address_string(msg.childAddress)
            role = next((r for r, a in self.addresses.items() if a == exited), None)
            if role is not None:
                self._recreate(role)

    def _recreate(self, role: str) -> None:
        log.warning("actor %s exited; recreating it", role)
        self.addresses.pop(role, None)
        self.pids.pop(role, None)
        if role == "pool":
            self.hub = []
        self.children[role] = self.createActor(child_roles(self.settings)[role])
        self._wire_all()

    def _watch(self) -> list:
        if self.stopping:
            return []
        pid = self.settings.get("parent_pid")
        if pid and not alive(pid):
            log.error("run.py (pid %s) is gone; shutting the actor system down", pid)
            self._shutdown_system()
            return []
        for role, child_pid in list(self.pids.items()):
            if not alive(child_pid):
                self._recreate(role)
        return [After(WATCH_EVERY_S, Watch())]

    def _shutdown_system(self) -> None:
        # An actor cannot shut down the system it runs in; a short-lived process can.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        group = self.settings.get("actor_group") or os.getpgrp()
        from actors import secret

        # The secret in the environment, never in argv (any local user can read argv).
        env = {**os.environ, "SLUICE_CLUSTER_SECRET": secret.get().decode()} if secret.installed() else None
        subprocess.Popen(
            [sys.executable, "-m", "actors.system", "stop", self.settings["SLUICE_ACTOR_HOST"],
             str(self.settings["SLUICE_ACTOR_PORT"]), str(group)],
            cwd=root,
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _address_string(address) -> str | None:
    try:
        return addressing.to_string(address)
    except AttributeError:  # a local address of a child that never started
        return None
