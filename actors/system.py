"""Starting and stopping the Thespian actor system so that no process outlives it.

multiprocTCPBase daemonizes its admin: it forks, the child calls setsid and forks the
admin, so the admin and every actor live in a process group of their own whose id is
that short-lived child's pid. `ActorSystem.shutdown()` asks the admin to stop everyone,
but an actor that died uncleanly can leave the admin waiting for it forever; so after
asking politely we wait a little, then SIGKILL whatever is left in that process group.

`python -m actors.system stop HOST PORT PGID` does the same from outside.

The orphan watch: when run.py dies without stopping the actor system, something outside
run.py stops it. While the admin lives, the admin does (`watch_from_admin`, on a thread
that `start` arms there: patches/thespian_admin_watch.py); it starts `python -m
actors.system stop ...` once run.py is gone. When the admin is gone (or the patch is left
out), `python -S -m actors.watchdog PARENT HOST PORT PGID` does: a small process of its
own (run.py starts it, and restarts it if it dies) that waits for run.py to end and then
stops the actor system if anything of it is left (`watch`; `python -m actors.system watch
...` does the same with a larger interpreter). Each lives outside the actors, so that no
actor's death (the Supervisor's included) takes it along. The commands get the cluster
secret in their environment (SLUICE_CLUSTER_SECRET), never in argv.

`prepare(host, secret)` is what every process that calls `ActorSystem(...)` does first:
run.py, the admin CLI, the stop command and the watchdog, benches and test probes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import patches
from actors import secret as cluster_secret

SYSTEM_BASE = "multiprocTCPBase"


def prepare(host: str, secret: bytes) -> None:
    """Install, before this process first calls `ActorSystem(...)`, what it and every
    process forked from it inherit: the cluster secret and the Thespian patches (signed
    frames, sockets bound to `host`, the poll selector: patches/)."""
    cluster_secret.install(secret)
    patches.install_thespian(host, secret)


def start(
    host: str,
    port: int,
    secret: bytes,
    log_defs: dict | None = None,
    join: str | None = None,
    pools: int = 1,
    undecided: bool = False,
):
    """Start (or join) the actor system bound to `host`, its frames authenticated with
    `secret`; -> (ActorSystem, group id or None). `log_defs`: the logging configuration of
    Thespian's logger, which writes every actor's log lines (protocols/logfmt.py): the admin
    itself (patches/thespian_admin_logs.py).
    `join`: the leader's "host:port": this system is a member of its Convention (see
    `joined`); `pools`: the Pools this host runs (actors/placement.py). `undecided`: a host
    of a cluster with a standby leader: neither leading nor following yet (then `lead` or
    `follow`)."""
    prepare(host, secret)
    from thespian.actors import ActorSystem

    from actors import placement
    from patches import thespian_admin_watch

    before = _children(os.getpid())
    # The admin inherits this disposition: only run.py decides how the system ends.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The admin forked here stops the system if this process dies without doing so.
    watch = functools.partial(watch_from_admin, os.getpid(), host, port)
    try:
        with thespian_admin_watch.armed(watch):
            asys = ActorSystem(
                SYSTEM_BASE, capabilities=placement.capabilities(host, port, join, pools, undecided), logDefs=log_defs
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    new = _children(os.getpid()) - before
    group = next(iter(new), None)  # the daemonizing child: its pid names the group
    return asys, group


class MemberStatus(NamedTuple):
    in_convention: bool  # the leader answered our registration and has not been lost since
    children: list  # the actors this host's admin started (on a member: the Pools placed here)


def member_status(asys, context=None) -> MemberStatus | None:
    """What this host's admin says of its Convention membership (None: no answer).
    `context`: the caller's `asys.private()` context when not on the main thread."""
    from thespian.system.messages.status import Thespian_StatusReq

    admin = asys._systemBase.adminAddr  # Thespian keeps no public name for it
    status = (context or asys).ask(admin, Thespian_StatusReq(), 1.0)
    if status is None or not hasattr(status, "conventionAttendees"):
        return None
    leader = status.conventionLeader
    attendees = [address for address, _valid in status.conventionAttendees]
    return MemberStatus(leader is not None and leader in attendees, list(status.childActors))


def joined(asys, within_s: float) -> bool:
    """Whether this member's admin has registered with its Convention leader and heard back
    within `within_s` (the leader then lists it: it answers only frames signed with the
    same secret, so a host with another secret never gets here)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        status = member_status(asys)
        if status is not None and status.in_convention:
            return True
        time.sleep(0.1)  # the registration is the admin's, on its own clock: nothing to wait on
    return False


PROBE_TIMEOUT_S = 1.0


class Prober:
    """Asks other hosts' actor systems whether they answer and lead (`probe`), each host
    from a private context of its own. Thespian sends one frame at a time per peer and
    retries a frame that failed for up to 5 minutes (35 s, 70 s, ... apart: thespian/system/
    transport/__init__.py `TransmitIntent.retry`), so a context shared by all peers stops
    reaching any of them once one is dead; and a context dropped while a peer is stalled
    (SIGSTOP, a network that drops packets) leaves that peer, when it wakes, answering an
    address that is gone, which Thespian's admin there retries for minutes too, holding
    the 20 frames it may have in flight (measured: a leader woken after a 50 s stall
    answered no probe for minutes). So a peer's context is kept while it fails, and
    replaced only after `RENEW_AFTER_S` of failures (a peer that died and came back)."""

    RENEW_AFTER_S = 30.0

    def __init__(self, asys):
        self.asys = asys
        self.contexts: dict[str, object] = {}
        self.failing_since: dict[str, float] = {}

    def probe(self, address: str):
        """-> actors/leadership.py `Probe` for the actor system at `address` ("host:port")."""
        from actors.leadership import UNREACHABLE

        context = self.contexts.get(address)
        if context is None:
            from thespian.actors import ExternalContext

            context = self.contexts[address] = ExternalContext(self.asys._systemBase.external_clone())
        answer = probe_leader(context, address)
        now = time.monotonic()
        if answer != UNREACHABLE:
            self.failing_since.pop(address, None)
        elif now - self.failing_since.setdefault(address, now) >= self.RENEW_AFTER_S:
            self.failing_since.pop(address)
            self._drop(address)
        return answer

    def _drop(self, address: str) -> None:
        context = self.contexts.pop(address, None)
        if context is not None:
            try:
                context.exit_clone()  # type: ignore[attr-defined]
            except Exception:  # its transport is closed either way
                pass

    def close(self) -> None:
        for address in list(self.contexts):
            self._drop(address)


def probe_leader(context, address: str):
    """Whether the actor system at `address` ("host:port") answers, and whether it leads
    (its `sluice.leader` capability) -> actors/leadership.py `Probe`. `context`: an
    `asys.private()` context used for probes only (a late answer to an earlier probe is told
    apart by the host it names); see `Prober`."""
    from thespian.system.messages.status import Thespian_StatusReq
    from thespian.system.transport.TCPTransport import TCPTransport

    from actors import placement
    from actors.leadership import UNREACHABLE, Probe

    deadline = time.monotonic() + PROBE_TIMEOUT_S
    try:
        reply = context.ask(TCPTransport.getAddressFromString(address), Thespian_StatusReq(), PROBE_TIMEOUT_S)
        while reply is not None:
            caps = getattr(reply, "capabilities", None)
            if isinstance(caps, dict) and caps.get(placement.HOST) == address:
                leads = caps.get(placement.LEADER) is True and not getattr(reply, "inShutdown", False)
                term = caps.get(placement.TERM)
                return Probe(True, leads, term if isinstance(term, int) and not isinstance(term, bool) else 0)
            reply = context.listen(max(0.0, deadline - time.monotonic()))  # a stray answer to an earlier probe
    except Exception:  # an address Thespian cannot reach or parse: not there
        return UNREACHABLE
    return UNREACHABLE


def follow(context, leader: str) -> None:
    """Make this host's actor system a member of `leader`'s Convention, at runtime: Thespian
    re-registers as soon as its `Convention Address.IPv4` capability changes
    (thespian/system/admin/convention.py `capabilities_have_changed` -> `setup_convention`)."""
    from actors import placement

    _update_capability(context, placement.CONVENTION_ADDRESS, leader)


def lead(context, me: str, term: int) -> None:
    """Make this host's actor system the Convention's leader, at runtime. The Convention
    address is set to this host itself, not removed: Thespian keeps the old leader's
    address when the capability disappears (`setup_convention`), and counts itself the
    leader when the address is its own (`isConventionLeader`), so it answers every
    member's registrations and drops those that stop. Then its `term` (actors/leadership.py)
    and `sluice.leader`: the leader-only actors (Supervisor, Pacers, Metrics, thread store)
    may be created here from now on."""
    from actors import placement

    _update_capability(context, placement.CONVENTION_ADDRESS, me)
    _update_capability(context, placement.TERM, term)
    _update_capability(context, placement.LEADER, True)


def demote(context, leader: str) -> None:
    """Stop leading and follow `leader` instead (a split healed: actors/keeper.py). Thespian
    tells every actor here of the changed capabilities and stops those whose
    `actorSystemCapabilityCheck` no longer holds (thespian/system/actorManager.py
    `checkNewCapabilities`): the Supervisor, Pacers, Metrics, thread store, and this host's
    own Pools and shards (they run on the leader only)."""
    from actors import placement

    _update_capability(context, placement.LEADER, False)
    follow(context, leader)


def _update_capability(context, name: str, value) -> None:
    """`ActorSystem.updateCapability` from `context`: the ActorSystem itself or an
    `asys.private()` context (a thread's), whose Thespian base lacks the method but has
    what it uses (a transmit to the admin, awaited): so Thespian's own code runs on it."""
    from thespian.system.systemBase import systemBase

    systemBase.updateCapability(context._systemBase, name, value)


STOP_GRACE_S = 5.0


def stop(asys, group: int | None, grace_s: float = STOP_GRACE_S, expected: bool = False) -> None:
    """Shut the actor system down, then SIGKILL what of its process group is left after
    `grace_s`. `expected`: leftovers are no surprise (a start that failed: run.py logged
    why), so their SIGKILL is not warned of."""
    try:
        asys.shutdown()
    finally:
        if group is not None:
            kill_group(group, grace_s, expected)


def kill_group(group: int, grace_s: float, expected: bool = False) -> None:
    """Wait up to `grace_s` for the group to be empty, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    while _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if (left := _group_members(group)) and not expected:
        # Seen in the log: a process the shutdown did not reach (an orphaned actor, before
        # a replaced Supervisor adopted every one: docs/reliability.md).
        logging.getLogger("sluice.system").warning(
            "%d process(es) of the actor system still ran %.1f s after the shutdown: SIGKILL", len(left), grace_s
        )
    if left:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Proc(NamedTuple):
    parent: int
    group: int
    session: int
    state: str  # "Z" zombie (dead, not reaped), "X" dead, else running or sleeping


def process_table() -> dict[int, Proc]:
    """Every process on the machine, from /proc (Linux)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        table[int(entry)] = Proc(int(fields[1]), int(fields[2]), int(fields[3]), fields[0])
    return table


def alive(pid: int, group: int | None = None) -> bool:
    """True unless the process is gone or a zombie (reads one /proc entry: the Supervisor
    asks this for every actor every second); with `group`, also unless it has left that
    process group (a pid reused by another process). An error other than "no such entry"
    (no file descriptor left: EMFILE) cannot tell, and says alive: a live run.py taken for
    dead would have its whole actor system stopped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return fields[0] not in ("Z", "X") and (group is None or int(fields[2]) == group)


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, including the daemonized actor system: its admin lives
    in a session of its own, led by a (zombie) child of `pid`."""
    table = process_table()
    out: set[int] = set()
    changed = True
    while changed:
        changed = False
        for child, proc in table.items():
            if child not in out and (proc.parent == pid or proc.parent in out or proc.session in out):
                out.add(child)
                changed = True
    return out


def cmdline(pid: int) -> str:
    """The command line of `pid`, its arguments space-separated ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def admin_pid(group: int, table: dict[int, Proc] | None = None) -> int | None:
    """The Thespian admin of the actor system in `group` (None: not found): the one live
    member whose parent is no other live member. The group's leader, the daemonizing child
    that forked it, is left out (a zombie, or about to exit); every actor descends from the
    admin. Asked right after `start`: once the admin is gone its orphaned actors have
    parents outside the group too."""
    table = process_table() if table is None else table
    members = {pid for pid, proc in table.items() if proc.group == group and proc.state not in ("Z", "X")}
    members.discard(group)
    roots = [pid for pid in members if table[pid].parent not in members]
    return roots[0] if len(roots) == 1 else None


def _children(pid: int) -> set[int]:
    """Children of `pid`, zombies included (the daemonizing child exits at once)."""
    return {p for p, proc in process_table().items() if proc.parent == pid}


def _group_members(group: int) -> set[int]:
    return {p for p, proc in process_table().items() if proc.group == group and proc.state not in ("Z", "X")}


WATCH_EVERY_S = 0.5


def start_watchdog(parent: int, host: str, port: int, group: int) -> subprocess.Popen:
    """The orphan watchdog process for the actor system in `group`, watching `parent`."""
    # -S: no site while it waits (actors/watchdog.py loads it to stop the system).
    return _command(["-S", "-m", "actors.watchdog", str(parent), host, str(port), str(group)])


def watch_from_admin(parent: int, host: str, port: int) -> None:
    """The orphan watch, in the admin process (on its thread: patches/thespian_admin_watch.py):
    once `parent` (the process that started the system: run.py) is gone, start the stop
    command, which stops the system politely and then kills its group, the admin with it.
    A parent that exits normally has stopped the system first (`stop` waits for the group
    to be empty), so the admin is gone before it could see that. A stop command that cannot
    be started (no fork: EAGAIN, ENOMEM, as when the OOM killer has just taken run.py) is
    tried again for `STOP_TRIES_S`; then the group is killed from here, the admin included.
    A stop command that ends (killed, say) or runs past `STOP_WITHIN_S` while this admin
    still lives has not stopped the system: the group is killed from here too."""
    fd = pidfd(parent)
    if fd is not None:
        wait_for_exit(fd)  # woken the moment run.py exits (run.py + admin killed ms apart)
    while alive(parent):
        time.sleep(WATCH_EVERY_S)  # no pidfd here: a poll of one /proc entry
    group = os.getpgrp()  # the admin's group is the system's
    deadline = time.monotonic() + STOP_TRIES_S
    while True:
        try:
            command = start_stop(host, port, group)
            break
        except OSError:
            if time.monotonic() > deadline:
                kill_group(group, 0)
                return
            time.sleep(WATCH_EVERY_S)  # the machine is short of processes or memory: a moment
    # A stop that works ends this admin, and this thread with it, before the wait returns.
    with contextlib.suppress(subprocess.TimeoutExpired):
        command.wait(STOP_WITHIN_S)
    kill_group(group, 0)


def pidfd(pid: int) -> int | None:
    """A pidfd of `pid`, readable once it has exited; None when it is gone already or this
    kernel has none (before Linux 5.3): then poll `alive`."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def wait_for_exit(fd: int) -> None:
    """Block until the process of pidfd `fd` has exited; closes `fd`."""
    try:
        poller = select.poll()  # not select.select: an fd past 1023 is fine
        poller.register(fd, select.POLLIN)
        poller.poll()
    finally:
        os.close(fd)


STOP_WITHIN_S = 60.0  # a polite stop takes seconds (Thespian's shutdown, then STOP_GRACE_S)


STOP_TRIES_S = 5.0


def _command(args: list[str]) -> subprocess.Popen:
    """`python ARGS` from the project's root, detached: its own session (a Ctrl-C meant for
    run.py must not reach it), the cluster secret in its environment."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=root,
        # The secret in the environment, never in argv (any local user can read argv).
        env={**os.environ, "SLUICE_CLUSTER_SECRET": cluster_secret.get().decode()},
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_stop(host: str, port: int, group: int) -> subprocess.Popen:
    """`python -m actors.system stop HOST PORT GROUP`, detached (`stop_from_outside`)."""
    return _command(["-m", "actors.system", "stop", host, str(port), str(group)])


def watch(parent: int, host: str, port: int, group: int) -> int:
    while alive(parent):
        time.sleep(WATCH_EVERY_S)  # a poll of one /proc entry: nothing to wait on instead
    if _group_members(group):  # run.py died without stopping the system: do it for it
        return stop_from_outside(host, port, group)
    return 0


def main(argv: list[str]) -> int:
    # Started by the admin's watch thread, which blocks every signal: take them again, so
    # that SIGTERM stops this command and an admin it forks is not born deaf to SIGCHLD.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if len(argv) == 5 and argv[0] == "watch":
        return watch(int(argv[1]), argv[2], int(argv[3]), int(argv[4]))
    if len(argv) != 4 or argv[0] != "stop":
        print("usage: python -m actors.system stop HOST PORT PGID | watch PARENT HOST PORT PGID", file=sys.stderr)
        return 2
    return stop_from_outside(argv[1], int(argv[2]), int(argv[3]))


def stop_from_outside(host: str, port: int, group: int) -> int:
    if not _group_members(group):
        # Nothing of the system is left (run.py stopped it after all): nothing to stop, and no
        # `ActorSystem(...)` that would start a fresh admin on its port only to stop it.
        return 0
    secret = os.environ.get("SLUICE_CLUSTER_SECRET", "").encode()
    if not secret:
        kill_group(group, 0)  # cannot talk to the admin without the secret: no polite way left
        return 0
    from protocols.config import reachable_host

    prepare(reachable_host(host), secret)
    from thespian.actors import ActorSystem

    try:
        stop(ActorSystem(SYSTEM_BASE, capabilities={"Admin Port": port}, logDefs=None), group)
    except Exception:
        kill_group(group, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
