"""Which Pool runs a call: the Pacer's routing over `SLUICE_POOLS` Pools.

Plain logic, no I/O: the Pacer (actors/pacer_logic.py) owns one `PoolChoice`, tells it
where each Pool is (`place`, from the directory the Supervisor wires it with) and asks it
for a Pool when a request arrives (`choose`). The Pool is chosen once per stream, when
the Pacer first sees the request (queued or granted at once), because the clients of a
queued request are admitted before the grant and listen at that Pool's hub already.

The rule: the least loaded Pool that is up, counting the calls this Pacer has granted on
each and the requests it has queued for each; among equals, the one after the last
chosen (round-robin), so that a steady trickle of short calls alternates rather than
piling on Pool 0. No Pool up (every one being replaced): the least loaded of all known,
whose replacement the grant then waits for. Each Pacer counts its own account's calls
only: with several accounts the Pools are balanced per account, which is balanced
overall when the accounts' loads are alike (docs/architecture.md, "Several Pools").
"""

from __future__ import annotations

from protocols import roles


class PoolChoice:
    """`at`: Pool role -> the incarnation (address) it is at now, None while it is down."""

    def __init__(self, pool_roles: list[str] | None = None):
        # Before the first directory: one Pool, "pool", whose incarnation is its name (the
        # logic's unit tests and the simulation address it so).
        self.at: dict[str, str | None] = {r: r for r in (pool_roles or [roles.POOL])}
        self._last = -1

    def place(self, role: str, incarnation: str | None) -> None:
        """The directory says Pool `role` is at `incarnation` (None: down)."""
        self.at[role] = incarnation

    def incarnation(self, role: str) -> str | None:
        return self.at.get(role)

    def known(self, role: str) -> bool:
        return role in self.at

    def up(self) -> list[str]:
        return [r for r, inc in self.at.items() if inc is not None]

    def choose(self, loads: dict[str, int]) -> str:
        """The Pool for a new call, given the calls (granted + queued) on each."""
        order = list(self.at)
        candidates = self.up() or order
        n = len(order)
        # Scan from the one after the last chosen: the first of the least loaded wins.
        start = (self._last + 1) % n
        rotated = [order[(start + i) % n] for i in range(n)]
        best = min((r for r in rotated if r in candidates), key=lambda r: loads.get(r, 0))
        self._last = order.index(best)
        return best
