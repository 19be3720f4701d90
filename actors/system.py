"""Starting and stopping the Thespian actor system so that no process outlives it.

multiprocTCPBase daemonizes its admin: it forks, the child calls setsid and forks the
admin, so the admin and every actor live in a process group of their own whose id is
that short-lived child's pid. `ActorSystem.shutdown()` asks the admin to stop everyone,
but an actor that died uncleanly can leave the admin waiting for it forever; so after
asking politely we wait a little, then SIGKILL whatever is left in that process group.

`python -m actors.system stop HOST PORT PGID` does the same from outside.

`python -m actors.system watch PARENT HOST PORT PGID` is the orphan watchdog: a small
process of its own (run.py starts it, and restarts it if it dies) that waits for run.py
to end and then stops the actor system if anything of it is left. It lives outside the
actor system so that no actor's death (the Supervisor's included) takes it along. Both
get the cluster secret in their environment (SLUICE_CLUSTER_SECRET), never in argv.

`prepare(host, secret)` is what every process that calls `ActorSystem(...)` does first:
run.py, the admin CLI, the stop command and the watchdog, benches and test probes.
"""

from __future__ import annotations

import os
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


def start(host: str, port: int, secret: bytes, log_defs: dict | None = None, join: str | None = None, pools: int = 1):
    """Start (or join) the actor system bound to `host`, its frames authenticated with
    `secret`; -> (ActorSystem, group id or None). `log_defs`: the logging configuration of
    Thespian's logger process, which writes every actor's log lines (protocols/logfmt.py).
    `join`: the leader's "host:port": this system is a member of its Convention (see
    `joined`); `pools`: the Pools this host runs (actors/placement.py)."""
    prepare(host, secret)
    from thespian.actors import ActorSystem

    from actors import placement

    before = _children(os.getpid())
    # The admin inherits this disposition: only run.py decides how the system ends.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asys = ActorSystem(SYSTEM_BASE, capabilities=placement.capabilities(host, port, join, pools), logDefs=log_defs)
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


def stop(asys, group: int | None, grace_s: float = 5.0) -> None:
    try:
        asys.shutdown()
    finally:
        if group is not None:
            kill_group(group, grace_s)


def kill_group(group: int, grace_s: float) -> None:
    """Wait up to `grace_s` for the group to be empty, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    while _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_members(group):
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


def alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (reads one /proc entry: the Supervisor
    asks this for every actor every second)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


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


def _children(pid: int) -> set[int]:
    """Children of `pid`, zombies included (the daemonizing child exits at once)."""
    return {p for p, proc in process_table().items() if proc.parent == pid}


def _group_members(group: int) -> set[int]:
    return {p for p, proc in process_table().items() if proc.group == group and proc.state not in ("Z", "X")}


WATCH_EVERY_S = 0.5


def start_watchdog(parent: int, host: str, port: int, group: int) -> subprocess.Popen:
    """The orphan watchdog for the actor system in `group`, watching `parent`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(
        [sys.executable, "-m", "actors.system", "watch", str(parent), host, str(port), str(group)],
        cwd=root,
        # The secret in the environment, never in argv (any local user can read argv).
        env={**os.environ, "SLUICE_CLUSTER_SECRET": cluster_secret.get().decode()},
        start_new_session=True,  # a Ctrl-C meant for run.py must not reach it
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def watch(parent: int, host: str, port: int, group: int) -> int:
    while alive(parent):
        time.sleep(WATCH_EVERY_S)  # a poll of one /proc entry: nothing to wait on instead
    if _group_members(group):  # run.py died without stopping the system: do it for it
        return stop_from_outside(host, port, group)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "watch":
        return watch(int(argv[1]), argv[2], int(argv[3]), int(argv[4]))
    if len(argv) != 4 or argv[0] != "stop":
        print("usage: python -m actors.system stop HOST PORT PGID | watch PARENT HOST PORT PGID", file=sys.stderr)
        return 2
    return stop_from_outside(argv[1], int(argv[2]), int(argv[3]))


def stop_from_outside(host: str, port: int, group: int) -> int:
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
