"""A watch of sluice's own, run on a thread in Thespian's admin process.

run.py must not leave its actor system running when it dies (SIGKILL, a crash): something
outside run.py has to notice and stop it. That used to be the orphan watchdog, a process
of its own that idles for the gateway's whole life (~4.3 MiB PSS: bench/NOTES.md "Idle
memory"). The admin is already such a process: it outlives run.py (Thespian daemonizes it)
and lives as long as the actor system. So the admin does the watching while it lives
(actors/system.py `watch_from_admin`), and run.py starts the watchdog process only when
the admin is gone (run.py `_Watchdog`).

Thespian's multiprocTCPBase forks the admin from the process that calls `ActorSystem(...)`
(`multiprocCommon.multiprocessCommon._startAdmin`: an `mp.Process` whose target is
`multiprocCommon.startAdmin`, which calls setsid, forks once more, constructs the admin
and runs it). `install()` wraps `startAdmin`: when `armed(watch)` is in force around the
`ActorSystem(...)` that forks it, the admin, once constructed, starts a daemon thread that
runs `watch()`; unarmed, Thespian's `startAdmin` runs as it is. The thread is started with
every signal blocked (it inherits the mask; the admin's main thread keeps its own), so
SIGCHLD and the rest still interrupt the admin's select loop, as Thespian expects. The
arming is cleared in the admin once the thread runs: the actors the admin forks do not
inherit a thread (fork keeps only the calling one) nor an armed watch (and they never
call `startAdmin`). Only a process that arms gets a watched admin: actors/system.py
`start` (run.py, benches, test probes) arms around its one `ActorSystem(...)` call; the
admin CLI and the stop command attach to a running admin and never arm.

Installed by `patches.install_thespian`, before `ActorSystem(...)`. Written for Thespian
4.0.x (4.0.1); on another version it is left out with a warning: `installed()` is False,
and run.py keeps the watchdog process for the whole life of the gateway, as before. No
upstream issue (Thespian has no hook for code of the application in its admin).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

_original: Callable | None = None  # Thespian's startAdmin, once installed
_armed: Callable[[], None] | None = None  # what the next admin forked from this process runs


def install() -> bool:
    """Wrap Thespian's `startAdmin` so that an armed admin runs the watch; False (Thespian
    unchanged, one warning) on a Thespian this was not written for. Idempotent."""
    global _original
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR, without="the orphan watchdog process stays"):
        return False
    from thespian.system import multiprocCommon

    if installed():
        return True
    if not callable(multiprocCommon.__dict__.get("startAdmin")) or not callable(
        getattr(multiprocCommon.multiprocessCommon, "_startAdmin", None)
    ):
        return versions.fallback(
            __name__, "Thespian's multiprocCommon is not the expected shape; the orphan watchdog process stays"
        )
    _original = multiprocCommon.startAdmin
    multiprocCommon.startAdmin = _start_admin
    return True


def installed() -> bool:
    from thespian.system import multiprocCommon

    return multiprocCommon.__dict__.get("startAdmin") is _start_admin


def uninstall() -> None:
    """Put Thespian's own back (tests)."""
    global _original
    if _original is None:
        return
    from thespian.system import multiprocCommon

    multiprocCommon.startAdmin = _original
    _original = None


@contextmanager
def armed(watch: Callable[[], None]) -> Iterator[bool]:
    """An admin that `ActorSystem(...)` forks within this block runs `watch()` on a daemon
    thread of its own; yields whether it will (the patch is installed). An `ActorSystem(...)`
    that finds an admin running forks none: nothing runs then."""
    global _armed
    _armed = watch
    try:
        yield installed()
    finally:
        _armed = None


def _start_admin(adminClass, *args):
    """Thespian's `startAdmin` (the admin's `mp.Process` target, in the forked child), with
    the admin class replaced by one that also starts the armed watch."""
    assert _original is not None
    watch = _armed
    if watch is None:
        return _original(adminClass, *args)

    def admin_then_watch(*admin_args, **admin_kwargs):
        # Here startAdmin has daemonized (setsid, the second fork): this is the admin process.
        admin = adminClass(*admin_args, **admin_kwargs)  # raises where the address is taken: no watch then
        start_watch(watch)
        return admin

    admin_then_watch.__name__ = adminClass.__name__  # startAdmin names the process after it
    return _original(admin_then_watch, *args)


def start_watch(watch: Callable[[], None]) -> threading.Thread:
    """`watch()` on a daemon thread that takes no signal (it is started with all of them
    blocked; the caller's mask is put back): a process-directed signal such as SIGCHLD goes
    to a thread that does not block it, and Thespian's admin counts on its main thread being
    interrupted by it."""
    global _armed
    _armed = None  # nothing forked from here on inherits it
    thread = threading.Thread(target=watch, name="sluice-admin-watch", daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread
