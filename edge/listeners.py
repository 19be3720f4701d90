"""Who listens to which hub stream on one edge process, and which frame events are new.

Plain logic, no I/O: `edge/dataplane.py`'s `HubClient` holds one `Listeners` and does the
wire work its answers call for; the simulation (`sim/harness.py`) runs the same class for
each simulated edge, so a fault in this bookkeeping breaks chaos seeds too.

A stream may have several listeners on one edge: two local flights that the Coalescer
joined to one stream (e.g. while coalescing was being switched back on). Each listener
asks the hub for the replay again when it subscribes, and the hub hears `Unsubscribe`
only when the last listener of the stream leaves; one leaving must not cut the other off
(the bug of chaos seed 21945).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

L = TypeVar("L", bound=Hashable)


class Listeners(Generic[L]):
    """stream id -> the listeners on it, in subscription order."""

    def __init__(self) -> None:
        self._by_stream: dict[str, list[L]] = {}

    def add(self, stream_id: str, listener: L) -> None:
        self._by_stream.setdefault(stream_id, []).append(listener)

    def remove(self, stream_id: str, listener: L) -> bool:
        """Drop one listener; True when it was the stream's last (the hub should hear
        `Unsubscribe`), False when others still listen or it was not listening."""
        listeners = self._by_stream.get(stream_id)
        if not listeners or listener not in listeners:
            return False
        listeners.remove(listener)
        if listeners:
            return False
        del self._by_stream[stream_id]
        return True

    def of(self, stream_id: str) -> list[L]:
        """The stream's listeners (a copy: a listener may leave while being told)."""
        return list(self._by_stream.get(stream_id, ()))

    def pop(self, stream_id: str) -> list[L]:
        """Drop every listener of the stream (the hub refused it); -> those dropped."""
        return self._by_stream.pop(stream_id, [])

    def pop_all(self) -> dict[str, list[L]]:
        """Drop everything (the hub connection is gone); -> what was listened to."""
        lost, self._by_stream = self._by_stream, {}
        return lost

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._by_stream

    def __bool__(self) -> bool:
        return bool(self._by_stream)

    def streams(self) -> list[str]:
        return list(self._by_stream)


def new_events(have: int, seq: int, events: list) -> list:
    """The events of a frame a listener does not have yet. `have`: how many events of the
    stream it holds; `seq`: the index of the frame's first event in the stream. A frame that
    starts beyond what it has belongs to an earlier subscription of this edge to the same
    stream (still on the wire); the replay that answers its own subscription brings those
    events, so that frame is dropped."""
    if seq > have:
        return []
    return events[have - seq :]
