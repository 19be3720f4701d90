"""Trace points: named stamps on a request's path, for `bench.trace`'s time attribution.

Product code calls `stamp(point, role, subject, detail)` where a request crosses a boundary
(an actor receives or sends a message, the edge asks the actor system, the Pool opens a
call, the hub publishes, the edge renders). Nothing happens unless a tracer was installed
with `install()`, which only the `python -m bench.trace launch` process does, before it
starts the gateway (the actor processes fork from it and inherit the tracer).

Off, a stamp is one call that tests one global (~40 ns; bench.trace's docstring has the
measurement): the arguments are objects the caller already holds, never formatted here.
"""

from __future__ import annotations

from collections.abc import Callable

Tracer = Callable[[str, str, object, object], None]

_tracer: Tracer | None = None


def stamp(point: str, role: str, subject: object = None, detail: object = None) -> None:
    """`point` was reached by `role` for `subject` (a message, a request or stream id)."""
    if _tracer is not None:
        _tracer(point, role, subject, detail)


def install(tracer: Tracer | None) -> None:
    """Send every stamp of this process (and of processes forked after) to `tracer`."""
    global _tracer
    _tracer = tracer
