"""Who hears that a member of the cluster died, and when: the Supervisor's part in a crash
(actors/supervisor.py), as plain code that the simulator plays too (sim/harness.py
`Simulation._crash` / `_restart`).

A dead Pool, Pacer or Coalescer shard held something for others (a Pool: calls, and the
leases and flights that name it; a Pacer: leases; a shard: flights and the leases it asked
for), so every Pacer and every Coalescer shard but the role itself hears
`MemberLost(role, old address)` and reclaims what the dead incarnation held. Every Pool
hears a shard's death too: its hub ends the streams the shard left unopened (a Pacer that
died with the shard cannot; actors/hub_logic.py `owner_lost`). Metrics and the
thread store hold nothing for others: their deaths are not announced. The announcement
waits until every member is up again (each has answered its new Wire): the replacement
is known to everyone first, and a member being recreated hears it too. A dead edge worker
(run.py reports it) is told to every Coalescer shard (its references) and to Metrics (its
keys' open streams) at once: no replacement of it is waited for.

See docs/reliability.md, "Process crashes".
"""

from __future__ import annotations

from collections.abc import Iterable

from protocols import messages as m
from protocols import roles


def holds_for_others(role: str) -> bool:
    """Whether the death of `role` must be announced: a Pool, a Pacer or a Coalescer shard."""
    return roles.is_pool(role) or roles.is_pacer(role) or roles.is_coalescer(role)


def reclaims(role: str) -> bool:
    """Whether `role` hears of others' deaths (it holds what they may have held)."""
    return roles.is_pacer(role) or roles.is_coalescer(role)


def hears(target: str, dead: str) -> bool:
    """Whether `target` hears of the death of `dead`: a Pacer or a shard of every other
    member's; a Pool of a shard's (the streams it admitted edges to)."""
    if target == dead:
        return False
    return reclaims(target) or (roles.is_pool(target) and roles.is_coalescer(dead))


class LostMembers:
    """Deaths not announced yet: `died(role, address)` when a member's death is seen;
    `announce(members)` once every member is up again -> `[(MemberLost, [target roles])]`,
    one per death in the order seen, the targets in the order of `members`, and forgets
    them."""

    def __init__(self) -> None:
        self.pending: dict[str, list[str]] = {}  # role -> addresses of its dead incarnations

    def died(self, role: str, address: str) -> None:
        self.pending.setdefault(role, []).append(address)

    def announce(self, members: Iterable[str]) -> list[tuple[m.MemberLost, list[str]]]:
        lost, self.pending = self.pending, {}
        members = list(members)
        return [
            (m.MemberLost(role, address), [target for target in members if hears(target, role)])
            for role, addresses in lost.items()
            if holds_for_others(role)
            for address in addresses
        ]


def edge_lost_targets(members: Iterable[str]) -> list[str]:
    """Who hears `MemberLost(edge, edge_id)`: every Coalescer shard, Metrics and the thread
    store (the replies that edge was streaming)."""
    return [role for role in members if roles.is_coalescer(role) or role in (roles.METRICS, roles.THREADS)]
