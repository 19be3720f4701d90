"""Every change sluice makes to someone else's library, in one fenced place.

One module per patched concern, each with a docstring (what, why, the upstream issue, the
version it was written for), an idempotent `install(...)`, a version check
(patches/versions.py) and `installed()`. Nothing here is installed on import, and no
other module installs a patch as a side effect: a process installs what it needs, once,
where it starts:

- `install_thespian(host, secret)` — before the process first calls `ActorSystem(...)`
  (`actors/system.prepare`: run.py, the admin CLI, the stop and watchdog commands,
  benches and test probes). The admin and every actor are forked from that process and
  inherit the patches.
- `install_httpcore()` — in the Pool process, before its first upstream connection
  (`actors/pool.PoolRuntime.start`).

| module               | library        | on an untested version |
|----------------------|----------------|------------------------|
| thespian_transport   | thespian 4.0.x | raises (security)      |
| thespian_bind        | thespian 4.0.x | raises (security)      |
| thespian_selector    | thespian 4.0.x | warning, not installed |
| thespian_convention  | thespian 4.0.x | warning, not installed |
| thespian_forwarding  | thespian 4.0.x | warning, not installed |
| thespian_child_exit  | thespian 4.0.x | warning, not installed |
| thespian_turns       | thespian 4.0.x | warning, not installed |
| thespian_proctitle   | thespian 4.0.x | warning, not installed |
| thespian_admin_logs  | thespian 4.0.x | warning, not installed |
| thespian_admin_watch | thespian 4.0.x | warning, not installed |
| httpcore_h2_reads    | httpcore 1.0.x | warning, not installed |
| httpcore_h2_expiry   | httpcore 1.0.x | warning, not installed |
| httpcore_rst_stream  | httpcore 1.0.x | raises (cost)          |
| httpcore_fast_locks  | httpcore 1.0.x | warning, not installed |
| httpcore_h2_one_write | httpcore 1.0.x | warning, not installed |
| httpcore_h2_empty_writes | httpcore 1.0.x, h2 4.x | warning, not installed |

`installed()` lists the ones in force in this process (tests, the admin `show`).
"""

from __future__ import annotations

import sys

THESPIAN = (
    "thespian_transport",
    "thespian_bind",
    "thespian_selector",
    "thespian_convention",
    "thespian_forwarding",
    "thespian_child_exit",
    "thespian_turns",
    "thespian_proctitle",
    "thespian_admin_logs",
    "thespian_admin_watch",
)
HTTPCORE = (
    "httpcore_h2_reads",
    "httpcore_h2_expiry",
    "httpcore_rst_stream",
    "httpcore_fast_locks",
    "httpcore_h2_one_write",
    "httpcore_h2_empty_writes",
)


def install_thespian(host: str, secret: bytes) -> None:
    """Signed frames, sockets bound to `host`, the poll selector, Convention timers that
    notice a lost host in seconds, forwarded creations that do not block later ones, an
    actor that stops although a child of it is on a lost host, two select turns a message
    instead of five, no search for setproctitle in every actor, the actors' log lines
    written by the admin (no logger process), an admin that runs the orphan watch when
    armed (no watchdog process); raises if a security patch cannot be installed on this
    Thespian."""
    from patches import (
        thespian_admin_logs,
        thespian_admin_watch,
        thespian_bind,
        thespian_child_exit,
        thespian_convention,
        thespian_forwarding,
        thespian_proctitle,
        thespian_selector,
        thespian_transport,
        thespian_turns,
    )

    thespian_transport.install(secret)
    thespian_bind.install(host)
    thespian_selector.install()
    thespian_convention.install()
    thespian_forwarding.install()
    thespian_child_exit.install()
    thespian_turns.install()
    thespian_proctitle.install()
    thespian_admin_logs.install()
    thespian_admin_watch.install()


def install_httpcore() -> None:
    """The Pool's fixes to httpcore; raises if the RST_STREAM cancel cannot be used."""
    from patches import (
        httpcore_fast_locks,
        httpcore_h2_empty_writes,
        httpcore_h2_expiry,
        httpcore_h2_one_write,
        httpcore_h2_reads,
        httpcore_rst_stream,
    )

    httpcore_rst_stream.install()
    httpcore_h2_reads.install()
    httpcore_h2_expiry.install()
    httpcore_fast_locks.install()
    httpcore_h2_one_write.install()
    httpcore_h2_empty_writes.install()


def installed() -> list[str]:
    """The patches in force in this process, by module name. A module never imported here
    cannot have been installed: asking does not import it (nor its library)."""
    modules = (sys.modules.get(f"patches.{name}") for name in THESPIAN + HTTPCORE)
    return [module.__name__.rpartition(".")[2] for module in modules if module is not None and module.installed()]
