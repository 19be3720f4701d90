"""Thespian's Convention timers, tuned so that a lost host is noticed in seconds, not minutes.

A Convention member re-registers with its leader every `CONVENTION_REREGISTRATION_PERIOD`
(default 7 min 22 s); the leader declares it dead after `CONVENTION_REGISTRATION_MISS_MAX`
(3) periods without one, so a host that dies silently (kill -9, power, network) is noticed
after ~22 minutes (thespian/system/admin/convention.py: `ConventionMemberData.
_reset_valid_timer`, `_convention_leader_checks`). Until the leader registers back, a
member's admin loop sleeps `CONVENTION_RESTART_PERIOD` (3 min 22 s) between its checks:
`convention_inattention_delay` picks a fresh timer of that length whenever the current one
has not expired yet (`ExpirationTimer.__bool__` is "expired"), and the loop only returns
to its convention checks when that timer runs out, whatever messages arrive meanwhile. So
with the period alone shortened a member never re-registered at all and was declared dead
after 3 periods while alive (measured on sluice; all three must be set together).

Thespian reads the three from the environment, parsed as whole "minutes:seconds", once,
when convention.py is first imported. `install()` sets the module attributes instead
(before the admin is forked from this process, which inherits them): the re-registration
period `PERIOD_S`, the restart period the same, `MISSES` misses. The leader then notices a
dead member after ~`PERIOD_S * MISSES` (measured 3.3 s with 1 s x 3: docs/scale-out.md);
each member costs one small signed frame each way per period. No upstream issue.

A fourth timer: how long an external `createActor` (the edge's and the keeper's lookup of
the Supervisor by its global name) waits for its answer, `MAX_CHILD_ACTOR_CREATE_DELAY`
in thespian/system/systemBase.py (50 s, read at each call). On a member the lookup is
forwarded to the leader; a leader that stalls (SIGSTOP, a long pause) or a network that
drops its packets never answers, and the edge's one lookup thread waited 50 s before it
could look again, at the standby that had taken over meanwhile (measured: the standby led
after ~4 s, its own edge served after 53 s). `CREATE_WAIT_S` (10 s) bounds it; creating
one actor takes well under a second.

Installed by `patches.install_thespian`, before `ActorSystem(...)`. Written for Thespian
4.0.x (4.0.1); on another version it is left out with a warning (member loss is then
noticed after Thespian's defaults, minutes).
"""

from __future__ import annotations

from datetime import timedelta

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

PERIOD_S = 1.0
MISSES = 3
CREATE_WAIT_S = 10.0
NAMES = ("CONVENTION_REREGISTRATION_PERIOD", "CONVENTION_RESTART_PERIOD", "CONVENTION_REGISTRATION_MISS_MAX")


def install() -> bool:
    """Tune the Convention timers of this process (and of every process forked from it);
    False (Thespian unchanged, one warning) on a Thespian this was not written for."""
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    from thespian.system import systemBase
    from thespian.system.admin import convention

    if not all(hasattr(convention, name) for name in NAMES) or not hasattr(systemBase, "MAX_CHILD_ACTOR_CREATE_DELAY"):
        return versions.fallback(__name__, "thespian.system.admin.convention has not the timers it expects")
    convention.CONVENTION_REREGISTRATION_PERIOD = timedelta(seconds=PERIOD_S)
    convention.CONVENTION_RESTART_PERIOD = timedelta(seconds=PERIOD_S)
    convention.CONVENTION_REGISTRATION_MISS_MAX = MISSES
    systemBase.MAX_CHILD_ACTOR_CREATE_DELAY = timedelta(seconds=CREATE_WAIT_S)
    return True


def installed() -> bool:
    import sys

    convention = sys.modules.get("thespian.system.admin.convention")
    return convention is not None and convention.CONVENTION_REREGISTRATION_PERIOD == timedelta(seconds=PERIOD_S)


def detection_s() -> float:
    """About how long the leader takes to notice a member that died silently."""
    return PERIOD_S * MISSES
