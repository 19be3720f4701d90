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
  and moves some of the leader's shards there (`shards_to_take`).

Which shards a member runs (`shards_to_take`, `rehome`): the shard count and the key ->
shard hash never change (every edge sends a key to the same shard role, and finds that
role's address in the directory), only where each shard role runs. A member that joins
takes `shards // hosts` of the leader's shards (hosts: the leader and every member, the
new one included), the highest-numbered first, as many as the leader has; a live
member's shards never move. A member that is lost has its shards recreated on the
leader. So the leader keeps the rest, and a member that joins later takes its share from
them (docs/scale-out.md, "Coalescer shards over the hosts").

An actor system started without these capabilities (a bench, a test probe) counts as a
leader: everything runs there, as on one host.
"""

from __future__ import annotations

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


def shards_to_take(homes: dict[str, str | None], hosts: int) -> list[str]:
    """The shard roles a member that just joined takes from the leader. `homes`: every
    shard role -> the member host it runs on, None for the leader; `hosts`: how many hosts
    the cluster has with the new member (the leader included)."""
    share = len(homes) // max(1, hosts)
    on_leader = sorted((role for role, host in homes.items() if host is None), key=roles.coalescer_shard, reverse=True)
    return on_leader[:share]


def rehome(homes: dict[str, str | None], lost: str) -> list[str]:
    """The shard roles that ran on the lost member `lost`: each is recreated on the leader."""
    return sorted((role for role, host in homes.items() if host == lost), key=roles.coalescer_shard)
