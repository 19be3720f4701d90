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
        self.pools: list[Any] = []
        self.busy: list[int] = []  # calls in progress, by pool

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        """A pool for one attempt of a call, held until the attempt ends."""
        index = min(range(len(self.pools)), key=self.busy.__getitem__, default=None)
        if index is None or self.busy[index] >= self.calls_per_pool:
            self.pools.append(self.make_pool())
            self.busy.append(0)
            index = len(self.pools) - 1
        self.busy[index] += 1
        try:
            yield self.pools[index]
        finally:
            self.busy[index] -= 1
