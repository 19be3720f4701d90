"""An actor that stops while a child of it is unreachable (on a lost host) still stops.

An actor asked to exit sends each child an ActorExitRequest and exits once every child has
confirmed (thespian/system/actorManager.py `_shutdownActor`, line 226). A request that
cannot be delivered (the child's host is gone: "ConnRefused ... declaring as DeadTarget")
should count as that child's exit: its `onError` is `lambda r, m:
self._childInaccessible(each, m)`, but the lambda reads the loop variable `each` when it is
called, after the loop: it names the last child, not the unreachable one. So the
unreachable child is never crossed off (and the last child is crossed off early), and the
actor waits for a confirmation that never comes. On sluice that is the leader's Supervisor,
the parent of the Pools and shards it placed on member hosts: once a member had been lost
(SIGKILL, a host gone), stopping the leader (Ctrl-C, SIGTERM) waited for the Supervisor
until `ActorSystem.shutdown()` gave up (10 s) and then `actors/system.stop` SIGKILLed the
actor group after its 5 s grace: 15 s, and the actors killed instead of stopped
(measured: `sluice stopped` 15.3 s after uvicorn finished).

`install()` wraps `ActorManager._childInaccessible` so that it crosses off the child the
failed request was addressed to (the intent's `targetAddr`, the second argument) instead of
the one the lambda names. Nothing else calls it. No upstream issue filed yet.

Installed by `patches.install_thespian`, before `ActorSystem(...)` (every actor is forked
from that process). Written for Thespian 4.0.x (4.0.1); on another version it is left out
with a warning (then a leader stopped after losing a member takes the 15 s again).
"""

from __future__ import annotations

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

_original = None


def install() -> bool:
    """Cross off the child an undeliverable exit request was addressed to, in this process
    and every process forked from it; False (Thespian unchanged, one warning) on a Thespian
    this was not written for. Idempotent."""
    global _original
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    from thespian.system.actorManager import ActorManager

    if installed():
        return True
    if not callable(getattr(ActorManager, "_childInaccessible", None)):
        return versions.fallback(__name__, "Thespian's ActorManager has no _childInaccessible")
    _original = ActorManager._childInaccessible
    ActorManager._childInaccessible = _child_inaccessible
    return True


def _child_inaccessible(self, child_address, exit_request_intent):
    # The intent is the ActorExitRequest that could not be delivered: its target is the child.
    target = getattr(exit_request_intent, "targetAddr", None)
    return _original(self, child_address if target is None else target, exit_request_intent)


def installed() -> bool:
    from thespian.system.actorManager import ActorManager

    return ActorManager._childInaccessible is _child_inaccessible
