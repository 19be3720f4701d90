"""run.py's keeper: the Supervisor and the orphan watchdog are never left dead.

The Supervisor recreates every other actor; this keeper, a thread in run.py (the process
that owns the actor system), does the same for the Supervisor. Every `EVERY_S` it checks
the Supervisor's pid (one /proc read) and, every `DIRECTORY_EVERY_S`, remembers the
Supervisor's directory. When the Supervisor is gone, it asks the admin for the global name
again (Thespian drops a global name when its actor exits, so this creates a new
Supervisor) and wires it with the last directory it saw: the new Supervisor adopts the
actors that still answer and recreates the others (actors/supervisor.py). run.py serves
only once the keeper remembers a first complete directory (`wait_for_directory`), so a
Supervisor killed from then on never leaves its actors orphaned beside new ones. One
lost before that (`first`: run.py's, while run.py waits) is not replaced: no directory
names the actors it created, so a replacement would create every role a second time
beside them. `wait_for_directory` raises `SupervisorLostAtStart` instead, and run.py
starts the actor system again (docs/reliability.md).

It also calls run.py's `_Watchdog.ensure` each turn: no orphan watchdog process while the
actor system's admin lives (the admin watches run.py: patches/thespian_admin_watch.py);
once the admin is gone, the watchdog process (actors/system.py `watch`) is started, and
restarted if it dies. On a member host of a cluster (SLUICE_JOIN) the Supervisor is the
leader's, kept by the leader's keeper (docs/scale-out.md); there the keeper watches the
Convention instead: when this host loses its leader (gone past Thespian's timers), the
Pools the leader's Supervisor placed here have no Supervisor any more, so it stops them;
a leader that comes back places new ones.

With a standby leader (SLUICE_JOIN lists the leader candidates: actors/leadership.py) the
keeper also moves the lead. On a member, when the leader is lost it stops the orphaned
Pools as above, then follows the candidate `Leadership.after_loss` names (Thespian
re-registers at once: actors/system.py `follow`), or, when that is this host, promotes it:
`system.lead`, run.py's `promote` (the leader's settings, its simulated provider), and from
then on it keeps the Supervisor as on a leader (a new one, wired with no directory: it
creates the Pacers, shards, Metrics, thread store and places every member's Pools). A
candidate it follows that never answers within `FOLLOW_WITHIN_S` counts as lost in turn.
On a leader it asks the other candidates every `SPLIT_EVERY_S` whether one leads too;
when one with a newer term does, this host steps down and follows it (`_check_split`);
a member asks its leader as often whether it still leads (docs/scale-out.md, "A standby
leader").

Thread safety: the keeper has its own `asys.private()` context (and a `system.Prober`,
with its own, for asking other hosts), like the edge's bridge threads; it never forks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from actors import addressing
from actors.leadership import Leadership
from actors.system import alive
from protocols import messages as m
from protocols import roles
from protocols.gateway_settings import Settings

log = logging.getLogger("sluice.keeper")

EVERY_S = 0.25
DIRECTORY_EVERY_S = 1.0
ASK_TIMEOUT_S = 2.0
FOLLOW_WITHIN_S = 5.0  # a candidate followed after a loss answers by then, or counts as lost
LEADER_SILENT_S = 3.0  # a leader that answers no probe for this long is lost (Thespian's own timers: 3 x 1 s)
SPLIT_EVERY_S = 2.0


class SupervisorLostAtStart(RuntimeError):
    """run.py's Supervisor was lost before the keeper saw a complete directory."""


class SupervisorKeeper:
    def __init__(
        self,
        asys,
        settings: Settings,
        ensure_watchdog: Callable[[], None] | None = None,
        keep_supervisor: bool = True,
        leadership: Leadership | None = None,
        leader: str | None = None,
        promote: Callable[[], Settings] | None = None,
        first=None,
    ):
        """`leadership`, `leader`, `promote`: with a standby leader, the candidates, the one
        this host follows now (None: this host leads), and run.py's callback for taking the
        lead (-> the leader's settings: its simulated provider started). `first`: the
        address of the Supervisor run.py created and wired; until `wait_for_directory`
        returns, its loss is not repaired but reported (`SupervisorLostAtStart`)."""
        self.asys, self.settings = asys, settings
        self.keep_supervisor = keep_supervisor
        self.leadership, self.leader = leadership, leader
        self.promote = promote
        self.demotions = 0
        self.term = 1 if leader is None else 0  # the term this host leads in (actors/leadership.py)
        self.leader_term = 0  # the term of the leader this host follows, as it last answered
        self.silent_since: float | None = None  # since when the leader this host follows answers no probe
        self.followed_at = time.monotonic()  # when this host last chose whom to follow
        self.promoted_at: float | None = None  # when this host took the lead (monotonic)
        self.in_convention = False  # on a member: whether its leader was there at the last look
        self.ensure_watchdog = ensure_watchdog
        self.directory: dict[str, str] = {}  # the last complete directory seen
        self.pid: int | None = None
        self.address = None
        self.replacements = 0
        self.remembered = threading.Event()  # set once a complete directory is remembered
        self.first = addressing.to_string(first) if first is not None else None
        self.starting = first is not None  # run.py waits for the first directory
        self.lost_at_start: str | None = None  # why run.py's Supervisor counts as lost before it
        self._settled = threading.Event()  # a first directory remembered, or the Supervisor lost before it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor-keeper", daemon=True)

    def start(self) -> SupervisorKeeper:
        self._thread.start()
        return self

    def wait_for_directory(self, timeout: float) -> bool:
        """Block until the keeper remembers a complete directory (run.py waits for it before
        it serves: a Supervisor killed from then on is replaced by one that adopts every
        actor, none is started twice); False after `timeout`. Raises
        `SupervisorLostAtStart` when run.py's Supervisor was lost before that. Once this
        returns, a lost Supervisor is replaced, as while serving."""
        self._settled.wait(timeout)
        with self._lock:
            self.starting = False
            lost = self.lost_at_start
        if lost is not None:
            raise SupervisorLostAtStart(lost)
        return self.remembered.is_set()

    def _lose_at_start(self, why: str) -> bool:
        """Whether run.py still waits for the first directory; if so, it hears `why` (the
        keeper stops: run.py stops this actor system, the lost Supervisor's actors with it)."""
        with self._lock:
            if not self.starting:
                return False
            self.lost_at_start = why
        self._settled.set()
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from actors.system import Prober

        probes = Prober(self.asys)
        with self.asys.private() as context:
            next_directory = next_split = 0.0
            while not self._stop.wait(EVERY_S):
                try:
                    if self.ensure_watchdog is not None:
                        self.ensure_watchdog()
                    if not self.keep_supervisor:
                        if time.monotonic() >= next_directory:
                            next_directory = time.monotonic() + DIRECTORY_EVERY_S
                            self._stop_orphans(context, probes)
                        continue
                    if self.leadership is not None and self.leadership.standby and time.monotonic() >= next_split:
                        next_split = time.monotonic() + SPLIT_EVERY_S
                        self._check_split(context, probes)
                        if not self.keep_supervisor:
                            continue  # stepped down: a member from now on
                    if self.pid is None or not alive(self.pid):
                        self._find_or_replace(context)
                        if self.lost_at_start is not None:
                            break  # run.py stops this actor system
                    elif not self.remembered.is_set() or time.monotonic() >= next_directory:
                        next_directory = time.monotonic() + DIRECTORY_EVERY_S
                        self._remember_directory(context)
                except Exception:  # the keeper must outlive whatever went wrong this turn
                    log.exception("supervisor keeper")
        probes.close()

    def _stop_orphans(self, context, probes=None) -> None:
        from thespian.actors import ActorExitRequest

        from actors import system

        status = system.member_status(self.asys, context)
        if status is None:
            return
        lost = self.in_convention and not status.in_convention
        if lost and status.children:
            log.warning("lost the cluster's leader: stopping the %d Pools it placed here", len(status.children))
            for child in status.children:
                context.tell(child, ActorExitRequest())
        self.in_convention = status.in_convention
        if self.leadership is None or not self.leadership.standby or probes is None:
            return
        now = time.monotonic()
        settled = now - self.followed_at >= FOLLOW_WITHIN_S
        if status.in_convention and self.leader is not None:
            # Thespian still lists the leader. It notices a leader's loss only when its
            # registrations fail to send: a leader that stalls (SIGSTOP, a long pause) or a
            # network that drops packets still accepts them. So ask the leader itself: one
            # that does not answer for LEADER_SILENT_S is lost; one that answers as a member
            # (it stepped down for a newer leader: two leaders met) is lost too.
            probe = probes.probe(self.leader)
            if probe.reachable:
                self.silent_since = None
                self.leader_term = max(self.leader_term, probe.term)
                if probe.leads or not settled:
                    return
                log.warning("the cluster's leader %s no longer leads", self.leader)
            elif self.silent_since is None or now - self.silent_since < LEADER_SILENT_S:
                self.silent_since = self.silent_since or now
                return
            else:
                log.warning("the cluster's leader %s has not answered for %.1f s", self.leader, now - self.silent_since)
            self.in_convention, self.silent_since = False, None
            self._after_loss(context, probes, status.children)
            return
        if status.in_convention:
            return
        if lost or settled:
            self._after_loss(context, probes, status.children if not lost else [])

    def _after_loss(self, context, probes, orphans: list) -> None:
        """The leader this host followed is gone (or the candidate it turned to never
        answered, or it stepped down): follow the next one, or lead."""
        from thespian.actors import ActorExitRequest

        from actors import system

        assert self.leadership is not None
        lost = self.leader or ""
        target = self.leadership.after_loss(lost, probes.probe)
        for child in orphans:  # Pools a Supervisor placed here before this host lost it
            context.tell(child, ActorExitRequest())
        self.followed_at = time.monotonic()
        if target != self.leadership.me:
            if target != self.leader:
                log.warning("the cluster's leader %s is lost: following %s", lost, target)
                system.follow(context, target)
                self.leader = target
            return
        self.term = self.leader_term + 1
        log.warning("the cluster's leader %s is lost: this host (%s) takes the lead, term %d", lost, target, self.term)
        system.lead(context, target, self.term)
        if self.promote is not None:
            self.settings = self.promote()
        self.leader, self.keep_supervisor, self.promoted_at = None, True, time.monotonic()
        self.pid = self.address = None
        self.directory = {}  # the lost leader's actors are gone: the new Supervisor creates its own

    def _check_split(self, context, probes) -> None:
        """This host leads: does another candidate lead too (a partition healed, or a leader
        that stalled past the loss timers woke up)? The older leader steps down
        (`Leadership.step_down`): it stops leading (`system.demote`: Thespian stops its
        leader-only actors and its own Pools and shards, which need a leader) and follows
        the newer one; its members notice that their leader no longer leads and follow it
        too."""
        from actors import system

        assert self.leadership is not None
        for address in self.leadership.others():
            probe = probes.probe(address)
            if not probe.leads:
                continue
            if not self.leadership.step_down(address, probe.term, self.term):
                log.error(
                    "%s leads the cluster too, in term %d (this host: %d): it steps down",
                    address,
                    probe.term,
                    self.term,
                )
                continue
            log.error(
                "%s leads the cluster too, in term %d (this host: %d): this host steps down",
                address,
                probe.term,
                self.term,
            )
            system.demote(context, address)
            self.leader, self.leader_term, self.keep_supervisor = address, probe.term, False
            self.in_convention, self.followed_at = False, time.monotonic()
            self.pid = self.address = self.promoted_at = None
            self.directory = {}
            self.demotions += 1
            return

    def _find_or_replace(self, context) -> None:
        from actors.supervisor import SupervisorActor
        from protocols.roles import SUPERVISOR_NAME

        if self.pid is not None:
            if self._lose_at_start(f"the Supervisor (pid {self.pid}) died before every actor was up"):
                return
            log.error("the Supervisor (pid %s) is gone; starting a new one", self.pid)
            self.pid = None
        address = context.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
        if self.first not in (None, addressing.to_string(address)) and self._lose_at_start(
            "the Supervisor died before every actor was up (a new one answers to its global name)"
        ):
            return  # never wired: it created nothing
        reply = self._ask(context, address, m.GetState())
        if not isinstance(reply, m.State):
            return  # try again next turn
        if not reply.state.get("wired"):
            self.replacements += 1
            context.tell(address, m.encode(m.Wire(roles.SUPERVISOR, dict(self.directory), self.settings.to_wire())))
        self.address, self.pid = address, reply.state["pid"]

    def _remember_directory(self, context) -> None:
        reply = self._ask(context, self.address, m.GetDirectory())
        if isinstance(reply, m.Directory) and reply.hub and reply.settings.get("complete"):  # only a complete one
            self.directory = dict(reply.entries)
            self.remembered.set()
            self._settled.set()

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
