"""A cheaper select for Thespian's TCP transport.

Thespian's transport loop builds a new `selectors.DefaultSelector()` on every turn
(its own comment: "perhaps this could be optimized"). On Linux that is epoll: one
epoll_create, one epoll_ctl per socket, epoll_wait and close — a dozen system calls per
turn, several turns per message. `PollSelector` registers in Python and makes one poll()
call. `python -m bench.thespian_hop` (two actors, 4,000 hops, three alternating rounds):
0.69–0.81 → 0.57–0.62 ms per hop, 1.06–1.13 → 0.95–0.99 CPU ms per message (both ends).
No upstream issue (Thespian's own TODO comment in thespian/system/transport/TCPTransport.py).

Only the transport module's view of `selectors` changes; asyncio, uvloop and everything
else keep the default. Installed by `patches.install_thespian`, before `ActorSystem(...)`,
so the admin and every actor forked from this process inherit it. Written for Thespian
4.0.x (4.0.1); an optimisation, so on another version it is left out with a warning.
"""

from __future__ import annotations

import selectors
import types

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."


def install() -> bool:
    """Give Thespian's transport module PollSelector; False (Thespian unchanged, one
    warning) on a Thespian this was not written for. Idempotent."""
    try:
        versions.check(__name__, LIBRARY, WRITTEN_FOR)
    except versions.UntestedVersion as exc:
        return versions.fallback(__name__, str(exc))
    from thespian.system.transport import TCPTransport

    if installed():
        return True
    if not isinstance(getattr(TCPTransport, "selectors", None), types.ModuleType):
        return versions.fallback(__name__, "Thespian's TCPTransport does not use the selectors module")
    view = types.SimpleNamespace(
        **{name: getattr(selectors, name) for name in dir(selectors) if not name.startswith("_")}
    )
    view.DefaultSelector = selectors.PollSelector
    TCPTransport.selectors = view
    return True


def installed() -> bool:
    from thespian.system.transport import TCPTransport

    return getattr(TCPTransport.selectors, "DefaultSelector", None) is selectors.PollSelector
