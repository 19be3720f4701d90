"""Starting and stopping the Thespian actor system so that no process outlives it.

multiprocTCPBase daemonizes its admin: it forks, the child calls setsid and forks the
admin, so the admin and every actor live in a process group of their own whose id is
that short-lived child's pid. `ActorSystem.shutdown()` asks the admin to stop everyone,
but an actor that died uncleanly can leave the admin waiting for it forever; so after
asking politely we wait a little, then SIGKILL whatever is left in that process group.

`python -m actors.system stop HOST PORT PGID` does the same from outside (the Supervisor
runs it when run.py died without shutting down).
"""
from __future__ import annotations

import os
import signal
import sys
import time

from actors import addressing

SYSTEM_BASE = "multiprocTCPBase"


def start(host: str, port: int):
    """Start (or join) the actor system bound to `host`; -> (ActorSystem, group id or None)."""
    addressing.bind_to(host)
    from thespian.actors import ActorSystem

    before = _children(os.getpid())
    # The admin inherits this disposition: only run.py decides how the system ends.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asys = ActorSystem(SYSTEM_BASE, capabilities={"Admin Port": port}, logDefs=None)
    finally:
        signal.signal(signal.SIGINT, previous)
    new = _children(os.getpid()) - before
    group = next(iter(new), None)  # the daemonizing child: its pid names the group
    return asys, group


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


def _children(pid: int) -> set[int]:
    """Children of `pid`, zombies included (the daemonizing child exits at once)."""
    return {p for p, (parent, _group, _state) in _table().items() if parent == pid}


def _group_members(group: int) -> set[int]:
    return {p for p, (_parent, g, state) in _table().items() if g == group and state not in ("Z", "X")}


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "stop":
        print("usage: python -m actors.system stop HOST PORT PGID", file=sys.stderr)
        return 2
    host, port, group = argv[1], int(argv[2]), int(argv[3])
    addressing.bind_to(host)
    from thespian.actors import ActorSystem

    try:
        stop(ActorSystem(SYSTEM_BASE, capabilities={"Admin Port": port}, logDefs=None), group)
    except Exception:
        kill_group(group, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
