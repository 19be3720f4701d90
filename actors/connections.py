"""One account's upstream connections: as many httpcore pools as its concurrent calls need.

httpcore 1.0 caps an HTTP/2 connection at 100 concurrent streams (its local
SETTINGS_MAX_CONCURRENT_STREAMS) and its pool never opens a second connection to an origin
while the first is alive: the 101st call waits inside the Pool, its lease already granted,
invisible to the Pacer, whatever `<ACCOUNT>_CONCURRENCY` allows (found by `bench/soak.py`:
1,000 distinct streams ran 100 at a time). So a call takes the least busy pool of its
account, and a further pool, with a connection of its own, is made when every pool carries
`CALLS_PER_POOL` calls. Pools are never dropped: an idle one's connections expire by the
account's keepalive and cost nothing after that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

CALLS_PER_POOL = 100  # httpcore's per-connection stream cap; an HTTP/1.1 pool's default connection cap


class AccountConnections:
    def __init__(self, make_pool: Callable[[], Any], calls_per_pool: int = CALLS_PER_POOL):
        self.make_pool, self.calls_per_pool = make_pool, calls_per_pool
        self.pools: list[Any] = []  # the pools calls are handed
        self.busy: dict[int, int] = {}  # id(pool) -> calls in progress on it
        self.retired: list[Any] = []  # broken pools still carrying calls; closed once idle

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        """A pool for one attempt of a call, held until the attempt ends."""
        pool = min(self.pools, key=lambda p: self.busy[id(p)], default=None)
        if pool is None or self.busy[id(pool)] >= self.calls_per_pool:
            pool = self.make_pool()
            self.pools.append(pool)
            self.busy[id(pool)] = 0
        self.busy[id(pool)] += 1
        try:
            yield pool
        finally:
            self.busy[id(pool)] -= 1

    def retire(self, pool: Any) -> None:
        """A connection of `pool` broke before a call's first byte: hand it out no more, so
        a retry gets a fresh connection, not the same broken state (under uvloop a reset as
        the connection opens can escape httpcore as "negative file descriptor" and stay in
        its pool). Calls already on it finish there."""
        if pool in self.pools:
            self.pools.remove(pool)
            self.retired.append(pool)

    def idle_retired(self) -> list[Any]:
        """Retired pools no call uses any more, to close (each once)."""
        idle = [p for p in self.retired if self.busy[id(p)] == 0]
        for pool in idle:
            self.retired.remove(pool)
            del self.busy[id(pool)]
        return idle
