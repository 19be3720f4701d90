"""A cheaper select for Thespian's TCP transport.

Thespian's transport loop builds a new `selectors.DefaultSelector()` on every turn
(its own comment: "perhaps this could be optimized"). On Linux that is epoll: one
epoll_create, one epoll_ctl per socket, epoll_wait and close — a dozen system calls per
turn, several turns per message. `PollSelector` registers in Python and makes one poll()
call. `python -m bench.thespian_hop` (two actors, 4,000 hops, three alternating rounds):
0.69–0.81 → 0.57–0.62 ms per hop, 1.06–1.13 → 0.95–0.99 CPU ms per message (both ends).
No upstream issue (Thespian's own TODO comment in thespian/system/transport/TCPTransport.py).

`LeanPollSelector` is PollSelector without its bookkeeping: Thespian registers every socket
it holds (each idle connection too) on every turn, and PollSelector makes a `SelectorKey`
and walks four Python frames per socket for it. The lean one registers with poll() at once
and makes a key only for a socket that is ready. It is the part of the selector interface
the transport uses (register, select, close; the same errors for a bad or repeated file
descriptor, the same timeout rounding and event mapping as PollSelector), not a general
selector. With 16 idle connections at each end (`bench.thespian_hop --idle 16`; a Coalescer
holds one per edge bridge thread) it and patches/thespian_turns.py's cheaper idle expiry take
~10 % off the CPU per message, nothing without idle connections (bench/NOTES.md "Thespian
messages, third pass").

Only the transport module's view of `selectors` changes; asyncio, uvloop and everything
else keep the default. Installed by `patches.install_thespian`, before `ActorSystem(...)`,
so the admin and every actor forked from this process inherit it. Written for Thespian
4.0.x (4.0.1); an optimisation, so on another version it is left out with a warning.
"""

from __future__ import annotations

import math
import select
import selectors
import types

from patches import versions

LIBRARY, WRITTEN_FOR = "thespian", "4.0."


class LeanPollSelector:
    """`selectors.PollSelector` as Thespian's transport uses it: one use per loop turn."""

    def __init__(self):
        self._poll = select.poll()
        self._events: dict[int, int] = {}  # fd -> EVENT_READ | EVENT_WRITE
        self._objects: dict[int, object] = {}  # fd -> what was registered, where it was not the fd

    def register(self, fileobj, events, data=None):
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = fileobj if type(fileobj) is int else selectors._fileobj_to_fd(fileobj)
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        if fd in self._events:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self._poll.register(
            fd,
            (select.POLLIN if events & selectors.EVENT_READ else 0)
            | (select.POLLOUT if events & selectors.EVENT_WRITE else 0),
        )
        self._events[fd] = events
        if data is not None or fileobj is not fd:
            self._objects[fd] = (fileobj, data)
        return None  # PollSelector returns a SelectorKey; the transport does not use it

    def select(self, timeout=None):
        if timeout is not None:
            timeout = 0 if timeout <= 0 else math.ceil(timeout * 1e3)  # as PollSelector: at least timeout
        try:
            polled = self._poll.poll(timeout)
        except InterruptedError:
            return []
        ready = []
        for fd, event in polled:
            registered = self._events.get(fd)
            if registered:
                events = (selectors.EVENT_WRITE if event & ~select.POLLIN else 0) | (
                    selectors.EVENT_READ if event & ~select.POLLOUT else 0
                )
                fileobj, data = self._objects.get(fd, (fd, None))
                ready.append((selectors.SelectorKey(fileobj, fd, registered, data), events & registered))
        return ready

    def close(self):
        self._events.clear()
        self._objects.clear()
        self._poll = None


def install() -> bool:
    """Give Thespian's transport module LeanPollSelector; False (Thespian unchanged, one
    warning) on a Thespian this was not written for. Idempotent."""
    if not versions.supported(__name__, LIBRARY, WRITTEN_FOR):
        return False
    from thespian.system.transport import TCPTransport

    if installed():
        return True
    if not isinstance(getattr(TCPTransport, "selectors", None), types.ModuleType):
        return versions.fallback(__name__, "Thespian's TCPTransport does not use the selectors module")
    view = types.SimpleNamespace(
        **{name: getattr(selectors, name) for name in dir(selectors) if not name.startswith("_")}
    )
    view.DefaultSelector = LeanPollSelector
    TCPTransport.selectors = view
    return True


def installed() -> bool:
    from thespian.system.transport import TCPTransport

    return getattr(TCPTransport.selectors, "DefaultSelector", None) is LeanPollSelector
