"""A creation Thespian forwards to another Convention member no longer blocks later ones.

When an admin cannot create an actor itself (the class's `actorSystemCapabilityCheck`
refuses its capabilities) it forwards the request to a member that can
(thespian/system/admin/adminCore.py `h_PendingActor`: the entry
`self._pendingChildren[childInstance] = [envelope]` at line 315, then `_not_compatible`
at line 330). The answer goes from that member straight to the requester, so the entry is
never used again, but it is only ever removed when a child of this admin becomes ready
(`_pendingActorReady`, line 430): it stays. For a global name that is fatal: every later
request for the same name is parked behind the stale entry as "already a pending global
creation for this name" (thespian/system/admin/globalNames.py lines 27-30) and never
answered (the requester gives up after 50 s). On sluice that is the Supervisor's global
name on a member host (docs/scale-out.md): the first edge of a member found the leader's
Supervisor, a second edge worker — or any lookup after the leader was replaced — hung.

`install()` wraps `ConventioneerAdmin._not_compatible` so that, once the request has been
forwarded (or refused), its pending entry is dropped: each later request is forwarded on
its own. No upstream issue filed yet.

Installed by `patches.install_thespian`, before `ActorSystem(...)` (the admin is forked from
that process). Written for Thespian 4.0.x (4.0.1); on another version it is left out with a
warning (a member host then finds the Supervisor once per admin: one edge worker, and no
recovery from a leader restart without restarting the member).
"""

from __future__ import annotations

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

_original = None


def install() -> bool:
    """Drop the pending entry of a forwarded creation in this process's admin (and every
    process forked from it); False (Thespian unchanged, one warning) on a Thespian this was
    not written for. Idempotent."""
    global _original
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    from thespian.system.admin.convention import ConventioneerAdmin

    if installed():
        return True
    if not callable(getattr(ConventioneerAdmin, "_not_compatible", None)):
        return versions.fallback(__name__, "Thespian's ConventioneerAdmin has no _not_compatible")
    _original = ConventioneerAdmin._not_compatible
    ConventioneerAdmin._not_compatible = _not_compatible
    return True


def _not_compatible(self, envelope):
    try:
        return _original(self, envelope)
    finally:
        pending = getattr(self, "_pendingChildren", None)
        if isinstance(pending, dict):
            for instance, envelopes in list(pending.items()):
                if envelopes and envelopes[0] is envelope:
                    del pending[instance]


def installed() -> bool:
    from thespian.system.admin.convention import ConventioneerAdmin

    return ConventioneerAdmin._not_compatible is _not_compatible
