"""Thespian's sockets bound to one host (loopback by default), and the address it advertises.

Thespian's TCP transport binds every socket to all interfaces ('') and unpickles whatever
arrives, so on a single host it must not be reachable from outside (its frames are also
signed: patches/thespian_transport.py). `install(host)` makes every socket the transport
opens in this process, and in every process forked from it (the admin and all actors:
multiprocTCPBase forks), bind to `host` instead — `SLUICE_ACTOR_HOST`, 127.0.0.1 unless a
deployment spreads actors over hosts — by wrapping `IPActorAddress.__init__`, where the
bind name is chosen. It also sets `THESPIAN_BASE_IPADDR`, the address Thespian advertises
for itself: without it Thespian asks the routing table for a "public" address, which would
not match the bind. No upstream issue.

Installed by `patches.install_thespian`, before `ActorSystem(...)`. Written for Thespian
4.0.x (4.0.1); it fails loudly on another version: the binding is what keeps the actor
ports off the network, so there is no fallback.
"""

from __future__ import annotations

import os

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."

_original_init = None
_bind_host: str | None = None


def install(host: str) -> None:
    """Bind all of Thespian's sockets to `host` (e.g. 127.0.0.1) from now on; a second call
    moves the binding to the new host. Raises on a Thespian this was not written for."""
    global _bind_host, _original_init
    versions.check(__name__, LIBRARY, WRITTEN_FOR)
    from thespian.system.transport import IPBase

    if not hasattr(getattr(IPBase, "IPActorAddress", None), "__init__"):
        raise RuntimeError("Thespian's IPBase has no IPActorAddress as patches/thespian_bind.py expects")
    _bind_host = host
    os.environ["THESPIAN_BASE_IPADDR"] = host
    if IPBase.IPActorAddress.__init__ is not _init_bound:
        _original_init = IPBase.IPActorAddress.__init__
        IPBase.IPActorAddress.__init__ = _init_bound


def _init_bound(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    if _bind_host and self.bindname[0] in ("", "0.0.0.0"):
        self.bindname = (_bind_host, self.bindname[1])


def installed() -> bool:
    from thespian.system.transport import IPBase

    return IPBase.IPActorAddress.__init__ is _init_bound and _bind_host is not None
