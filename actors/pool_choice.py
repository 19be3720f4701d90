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

Locality, with several hosts (docs/scale-out.md, "Pool locality"): `choose(loads, near)`
prefers the Pools of host `near` (where the flight's first client arrived; each Pool's
host comes from the Supervisor's Wire, `place`), so the stream's tokens go from that
host's hub to that host's edge without crossing the network. The least loaded local Pool
wins unless it is much more loaded than the least loaded of all: more than
`LOCAL_FACTOR` times its calls plus `LOCAL_SLACK` (`spill`). Then the call goes to the
least loaded of all: a host that gets most of the traffic (an uneven load balancer)
still spreads its calls, keeping its own Pools about twice as busy as the others at
most. No local Pool up (or `near` unknown, "" on one host): the least loaded of all.
"""

from __future__ import annotations

from protocols import roles

# A local Pool is "much more loaded" (the call goes elsewhere) when it has more than
# LOCAL_FACTOR x + LOCAL_SLACK calls, x being the least loaded Pool's: a few calls of
# slack so that light traffic stays local, a factor so that heavy traffic still spreads.
LOCAL_FACTOR = 2
LOCAL_SLACK = 4


def spill(local: int, least: int) -> bool:
    """Whether a call should leave its host: its least loaded Pool has `local` calls, the
    cluster's least loaded `least`."""
    return local > LOCAL_FACTOR * least + LOCAL_SLACK


class PoolChoice:
    """`at`: Pool role -> the incarnation (address) it is at now, None while it is down;
    `hosts`: Pool role -> the host it runs on (placement HOST name), where known."""

    def __init__(self, pool_roles: list[str] | None = None, hosts: dict[str, str] | None = None):
        # Before the first directory: one Pool, "pool", whose incarnation is its name (the
        # logic's unit tests and the simulation address it so).
        self.at: dict[str, str | None] = {r: r for r in (pool_roles or [roles.POOL])}
        self.hosts: dict[str, str] = dict(hosts or {})
        self._last = -1

    def place(self, role: str, incarnation: str | None, host: str = "") -> None:
        """The directory says Pool `role` is at `incarnation` (None: down), on `host`
        ("": not said; a host it was known on stays)."""
        self.at[role] = incarnation
        if host:
            self.hosts[role] = host

    def incarnation(self, role: str) -> str | None:
        return self.at.get(role)

    def known(self, role: str) -> bool:
        return role in self.at

    def up(self) -> list[str]:
        return [r for r, inc in self.at.items() if inc is not None]

    def choose(self, loads: dict[str, int], near: str = "", busy: dict[str, int] | None = None) -> str:
        """The Pool for a new call, given the calls (granted + queued) on each; `near`: the
        host the call's first client arrived at ("": anywhere); `busy`: the loads the
        "much more loaded" test compares (default `loads`; the Pacer leaves out the lease
        slices' grants held unused)."""
        busy = loads if busy is None else busy
        order = list(self.at)
        candidates = self.up() or order
        n = len(order)
        # Scan from the one after the last chosen: the first of the least loaded wins.
        start = (self._last + 1) % n
        rotated = [r for r in (order[(start + i) % n] for i in range(n)) if r in candidates]
        best = min(rotated, key=lambda r: loads.get(r, 0))
        local = [r for r in rotated if near and self.hosts.get(r) == near and self.at.get(r) is not None]
        if local:
            nearest = min(local, key=lambda r: loads.get(r, 0))
            if not spill(busy.get(nearest, 0), min(busy.get(r, 0) for r in rotated)):
                best = nearest
        self._last = order.index(best)
        return best
