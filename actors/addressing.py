"""Actor addresses as plain strings, and keeping Thespian's sockets on loopback.

Messages are msgpack, so an address travels as "host:port" (multiprocTCPBase only) and is
turned back into a Thespian `ActorAddress` at the receiving end.

Thespian's TCP transport binds every socket to all interfaces ('') and unpickles whatever
arrives, so on a single host it must not be reachable from outside. `bind_to(host)` makes
every socket the transport opens in this process, and in every process forked from it
(the admin and all actors: multiprocTCPBase forks), bind to `host` instead. Call it
before `ActorSystem(...)`.
"""
from __future__ import annotations

import os

from thespian.actors import ActorAddress
from thespian.system.transport import IPBase

_original_init = IPBase.IPActorAddress.__init__
_bind_host: str | None = None


def bind_to(host: str) -> None:
    """Bind all of Thespian's sockets to `host` (e.g. 127.0.0.1) from now on."""
    global _bind_host
    _bind_host = host
    # The address Thespian advertises for itself; without it Thespian asks the routing
    # table for a "public" address, which would not match a loopback bind.
    os.environ["THESPIAN_BASE_IPADDR"] = host
    IPBase.IPActorAddress.__init__ = _init_bound
    from actors import selector

    selector.install()  # the same "before ActorSystem()" moment: see actors/selector.py


def _init_bound(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    if _bind_host and self.bindname[0] in ("", "0.0.0.0"):
        self.bindname = (_bind_host, self.bindname[1])


def to_string(address: ActorAddress) -> str:
    host, port = address.addressDetails.sockname[:2]
    return f"{host}:{port}"


def from_string(text: str) -> ActorAddress:
    host, _, port = text.rpartition(":")
    return ActorAddress(IPBase.TCPv4ActorAddress(host, int(port), external=True))
