"""run.py's keeper: the Supervisor and the orphan watchdog are never left dead.

The Supervisor recreates every other actor; this keeper, a thread in run.py (the process
that owns the actor system), does the same for the Supervisor. Every `EVERY_S` it checks
the Supervisor's pid (one /proc read) and, every `DIRECTORY_EVERY_S`, remembers the
Supervisor's directory. When the Supervisor is gone, it asks the admin for the global name
again (Thespian drops a global name when its actor exits, so this creates a new
Supervisor) and wires it with the last directory it saw: the new Supervisor adopts the
actors that still answer and recreates the others (actors/supervisor.py).

It also restarts the orphan watchdog process (actors/system.py `watch`) if that dies. On a
member host of a cluster (SLUICE_JOIN) the Supervisor is the leader's, kept by the
leader's keeper (docs/scale-out.md); there the keeper watches the Convention instead: when
this host loses its leader (gone past Thespian's timers), the Pools the leader's
Supervisor placed here have no Supervisor any more, so it stops them; a leader that comes
back places new ones.

Thread safety: the keeper has its own `asys.private()` context, like the edge's bridge
threads; it never forks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from actors.system import alive
from protocols import messages as m
from protocols import roles
from protocols.gateway_settings import Settings

log = logging.getLogger("sluice.keeper")

EVERY_S = 0.25
DIRECTORY_EVERY_S = 1.0
ASK_TIMEOUT_S = 2.0


class SupervisorKeeper:
    def __init__(
        self, asys, settings: Settings, ensure_watchdog: Callable[[], None] | None = None, keep_supervisor: bool = True
    ):
        self.asys, self.settings = asys, settings
        self.keep_supervisor = keep_supervisor
        self.in_convention = False  # on a member: whether its leader was there at the last look
        self.ensure_watchdog = ensure_watchdog
        self.directory: dict[str, str] = {}  # the last complete directory seen
        self.pid: int | None = None
        self.address = None
        self.replacements = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor-keeper", daemon=True)

    def start(self) -> SupervisorKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self.asys.private() as context:
            next_directory = 0.0
            while not self._stop.wait(EVERY_S):
                try:
                    if self.ensure_watchdog is not None:
                        self.ensure_watchdog()
                    if not self.keep_supervisor:
                        if time.monotonic() >= next_directory:
                            next_directory = time.monotonic() + DIRECTORY_EVERY_S
                            self._stop_orphans(context)
                        continue
                    if self.pid is None or not alive(self.pid):
                        self._find_or_replace(context)
                    elif time.monotonic() >= next_directory:
                        next_directory = time.monotonic() + DIRECTORY_EVERY_S
                        self._remember_directory(context)
                except Exception:  # the keeper must outlive whatever went wrong this turn
                    log.exception("supervisor keeper")

    def _stop_orphans(self, context) -> None:
        from thespian.actors import ActorExitRequest

        from actors.system import member_status

        status = member_status(self.asys, context)
        if status is None:
            return
        if self.in_convention and not status.in_convention and status.children:
            log.warning("lost the cluster's leader: stopping the %d Pools it placed here", len(status.children))
            for child in status.children:
                context.tell(child, ActorExitRequest())
        self.in_convention = status.in_convention

    def _find_or_replace(self, context) -> None:
        from actors.supervisor import SupervisorActor
        from protocols.roles import SUPERVISOR_NAME

        if self.pid is not None:
            log.error("the Supervisor (pid %s) is gone; starting a new one", self.pid)
            self.pid = None
        address = context.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
        reply = self._ask(context, address, m.GetState())
        if not isinstance(reply, m.State):
            return  # try again next turn
        if not reply.state.get("wired"):
            self.replacements += 1
            context.tell(address, m.encode(m.Wire(roles.SUPERVISOR, dict(self.directory), self.settings.to_wire())))
        self.address, self.pid = address, reply.state["pid"]

    def _remember_directory(self, context) -> None:
        reply = self._ask(context, self.address, m.GetDirectory())
        if isinstance(reply, m.Directory) and reply.hub:  # only a complete one
            self.directory = dict(reply.entries)

    @staticmethod
    def _ask(context, address, msg):
        expect = m.REPLIES[type(msg)]
        deadline = time.monotonic() + ASK_TIMEOUT_S
        reply = context.ask(address, m.encode(msg), ASK_TIMEOUT_S)
        while reply is not None:
            decoded = m.decode(reply) if isinstance(reply, (bytes, bytearray)) else None
            if isinstance(decoded, expect):
                return decoded
            reply = context.listen(max(0.0, deadline - time.monotonic()))  # a stray earlier answer
        return None
