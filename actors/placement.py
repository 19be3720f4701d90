"""Which host of a Convention runs which actor: Thespian capabilities and requirements.

Each host's actor system advertises capabilities (`capabilities`): its name
(`HOST`: its SLUICE_ACTOR_HOST:SLUICE_ACTOR_PORT, unique in the cluster), whether it
leads (`LEADER`), the interface its sockets bind (`ACTOR_HOST`) and how many Pools it
runs (`POOLS`). A member also names its leader (`Convention Address.IPv4`, Thespian's
own capability: the member's admin registers there, docs/scale-out.md).

Thespian asks an actor class where it may run (`actorSystemCapabilityCheck(capabilities,
requirements)`) before creating it; an admin whose capabilities do not fit forwards the
creation to a Convention member whose do (thespian/system/admin/convention.py
`_not_compatible`). So:

- `leader_only`: the Supervisor, the Pacers, Metrics, the thread store. A member asking its own admin for the Supervisor's global name is forwarded to
  the leader, whose admin answers with the Supervisor it has: that is how a member's
  edges find the cluster's one Supervisor.
- `on_host`: a Pool or a Coalescer shard goes where its requirements say (`{HOST:
  name}`), else on the leader; the Supervisor places each member's Pools on that member,
  and spreads the shards over every host (`spread`).

Which shards each host runs (`spread`): the shard count and the key -> shard hash never
change (every edge sends a key to the same shard role, and finds that role's address in
the directory), only where each shard role runs. After every join and every loss each
host holds `shards // hosts` shards or one more, and as few shards as possible move to
get there (a move costs something: docs/scale-out.md, "Coalescer shards over the hosts").
A lost member's shards are placed where the spread needs them (recreated there), any
host, not only the leader; a live member may give a shard to a host that joined.

An actor system started without these capabilities (a bench, a test probe) counts as a
leader: everything runs there, as on one host.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocols import roles

HOST = "sluice.host"
LEADER = "sluice.leader"
ACTOR_HOST = "sluice.actor_host"
POOLS = "sluice.pools"
TERM = "sluice.term"  # with a standby leader: the term this host leads in (actors/leadership.py)
CONVENTION_ADDRESS = "Convention Address.IPv4"  # Thespian's: the leader a member registers with


def capabilities(host: str, port: int, join: str | None, pools: int, undecided: bool = False) -> dict:
    """The capabilities of this host's actor system (`join`: the leader's "host:port").
    `undecided`: a host of a cluster with a standby leader, before it knows whether it
    leads or whom it follows (actors/leadership.py): no leader named, not leading either;
    actors/system.py `lead` or `follow` then updates both."""
    caps = {"Admin Port": port, HOST: f"{host}:{port}", LEADER: join is None, ACTOR_HOST: host, POOLS: pools}
    if undecided:
        caps[LEADER] = False
    elif join is not None:
        caps[CONVENTION_ADDRESS] = join
    return caps


def leader_only(capabilities: dict, requirements: dict) -> bool:
    return capabilities.get(LEADER, True) is not False


def on_host(capabilities: dict, requirements: dict) -> bool:
    """Where the requirements name a host: there only; else on the leader."""
    wanted = (requirements or {}).get(HOST)
    if wanted is None:
        return leader_only(capabilities, requirements)
    return capabilities.get(HOST) == wanted


def member_of(capabilities: dict) -> dict | None:
    """What the Supervisor needs of a member that joined (its Convention capabilities), or
    None for a system that is no sluice host."""
    host, actor_host, pools = capabilities.get(HOST), capabilities.get(ACTOR_HOST), capabilities.get(POOLS)
    if not isinstance(host, str) or not isinstance(actor_host, str) or capabilities.get(LEADER) is not False:
        return None
    if isinstance(pools, bool) or not isinstance(pools, int) or pools < 1:
        return None
    return {"host": host, "actor_host": actor_host, "pools": pools}


def spread(homes: dict[str, str | None], hosts: Sequence[str | None]) -> dict[str, str | None]:
    """Where shards must go so that every host holds `len(homes) // len(hosts)` or one more,
    moving as few as possible: `{role: host}` for each shard that moves, or whose host is
    gone (it is recreated there). `homes`: every shard role -> the host it runs on (None:
    the leader); `hosts`: the live hosts, the leader (None) included, in the order they
    joined.

    Fewest moves: the hosts that hold the most keep the extra shards (`shards % hosts` of
    them hold one more: a member before the leader, which runs every Pacer and Metrics
    too, then the earlier member); every host gives away what it holds beyond its target,
    the highest-numbered shards first; the shards given away and those of gone hosts fill
    the hosts below their target, in `hosts` order. A host above its target must lose that
    many shards whatever is chosen, so no placement moves fewer (tests/test_placement.py
    checks it against every placement of small clusters)."""
    live = list(dict.fromkeys(hosts)) or [None]
    held: dict[str | None, list[str]] = {host: [] for host in live}
    loose: list[str] = []  # shards of hosts that are gone
    for role in sorted(homes, key=roles.coalescer_shard):
        (held[homes[role]] if homes[role] in held else loose).append(role)
    share, extra = divmod(len(homes), len(live))
    keeps_extra = sorted(live, key=lambda host: (-len(held[host]), host is None, live.index(host)))[:extra]
    target = {host: share + (host in keeps_extra) for host in live}
    for host in live:
        surplus = len(held[host]) - target[host]
        if surplus > 0:
            loose.extend(held[host][-surplus:])
    loose.sort(key=roles.coalescer_shard, reverse=True)
    moves: dict[str, str | None] = {}
    for host in live:
        for _ in range(target[host] - len(held[host])):
            moves[loose.pop(0)] = host
    return moves
