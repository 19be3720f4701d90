"""No search of sys.path for setproctitle in every actor Thespian starts.

Thespian names each process it starts (`thespian.system.utilis.setProcName`: the admin,
more than once, the logger and every actor) with `from setproctitle import setproctitle`
inside a `try`, an optional library sluice does not install. Each failed import walks
sys.path again (every finder, the editable install's among them, a stat per entry):
work in each freshly forked process, and objects written to pages it would otherwise
share with its parent — ~0.4 MiB private over the idle tree (bench/NOTES.md "Idle
memory", `python -m bench.idle_memory`).

`install()` makes that search once, in the process that starts the actor system: where
setproctitle is not to be found it records the miss as Python does for a module known
to be absent (`sys.modules["setproctitle"] = None`), so Thespian's import fails at once,
in this process and every process forked from it, and its `except` goes on as before
(processes keep Thespian's names where setproctitle is installed: nothing is recorded
then). Installed by `patches.install_thespian`, before `ActorSystem(...)`. Written for
Thespian 4.0.x (4.0.1); an optimisation, so on another version it is left out with a
warning. No upstream issue.
"""

from __future__ import annotations

import importlib.util
import sys

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."
OPTIONAL = "setproctitle"  # what thespian.system.utilis.setProcName tries to import


def install() -> bool:
    """Record that setproctitle is not installed (when it is not), in this process and every
    process forked from it; False (nothing recorded, one warning) on a Thespian this was not
    written for. Idempotent."""
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    if OPTIONAL not in sys.modules and importlib.util.find_spec(OPTIONAL) is None:
        sys.modules[OPTIONAL] = None  # type: ignore[assignment]  # Python's own mark of a known miss
    return True


def installed() -> bool:
    """Whether the miss is recorded (never where setproctitle is installed)."""
    return OPTIONAL in sys.modules and sys.modules[OPTIONAL] is None


def uninstall() -> None:
    """Forget the recorded miss (tests)."""
    if installed():
        del sys.modules[OPTIONAL]
