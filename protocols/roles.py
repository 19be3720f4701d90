"""Role names: what each actor is called in the Supervisor's directory. Built and parsed
here, and nowhere else.

A role travels as a plain string (`Wire.role`, the keys of `Directory.entries`,
`MemberLost.role`, `Ready.role`, the admin answers' `results`), so messages stay plain
msgpack; this module is the one place that knows the shapes:

    supervisor, pool, metrics, threads   one of each
    pacer:<account>                      one per provider account, lower case ("pacer:perplexity")
    coalescer:<shard>                    one per key shard, 0 .. COALESCER_SHARDS - 1
    pool, pool:<n>                       the Pools, SLUICE_POOLS of them: Pool 0 is "pool"
                                         (so one Pool is named as it always was), the
                                         others "pool:1" .. "pool:<SLUICE_POOLS - 1>"

`parse` turns a string into a `Role` (kind + the part after the colon) and refuses anything
else with a ValueError that names it; the `is_*` predicates answer for any string without
raising (a sender may be an address, not a role).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocols.config import account
from protocols.settings import ProviderConfig

# The Thespian global name the Supervisor is started under (run.py), so that any process
# joining the actor system (an edge, `run.py admin`, the keeper) finds it.
SUPERVISOR_NAME = "sluice-supervisor"

SUPERVISOR = "supervisor"
POOL = "pool"
METRICS = "metrics"
THREADS = "threads"
SINGLETONS = (SUPERVISOR, POOL, METRICS, THREADS)

# Not an actor: an edge process, named in `MemberLost(EDGE, edge_id)` when a worker dies
# (edge/worker_set.py), so the Coalescers drop the references it held.
EDGE = "edge"

# kinds of the roles there are several of: "<kind>:<name>"
PACER = "pacer"
COALESCER = "coalescer"
KINDS = SINGLETONS + (PACER, COALESCER)


@dataclass(frozen=True, slots=True)
class Role:
    """A parsed role: `kind` ("pacer", "pool", ...) and, for pacers and coalescers, `name`
    (the account, lower case; the shard number as text)."""

    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    @property
    def shard(self) -> int:
        """The shard number of a coalescer role; ValueError for any other kind."""
        if self.kind != COALESCER:
            raise ValueError(f"{self} is not a coalescer role")
        return int(self.name)


def pacer(account_name: str) -> str:
    """The Pacer role of an account ("PERPLEXITY" or "perplexity" -> "pacer:perplexity")."""
    name = account_name.strip().lower()
    if not name or ":" in name:
        raise ValueError(f"not an account name: {account_name!r}")
    return f"{PACER}:{name}"


def pacer_for(provider: str) -> str:
    """The Pacer guarding the rate limit of the account `provider` bills to
    ("perplexity_sonar" -> "pacer:perplexity"); KeyError for an unknown provider."""
    return pacer(account(provider))


def coalescer(shard: int) -> str:
    """The Coalescer role of key shard `shard` (0 -> "coalescer:0")."""
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"a coalescer shard is an int >= 0, got {shard!r}")
    return f"{COALESCER}:{shard}"


def pool(index: int) -> str:
    """The role of Pool `index` (0 -> "pool", 1 -> "pool:1")."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"a pool index is an int >= 0, got {index!r}")
    return POOL if index == 0 else f"{POOL}:{index}"


def pools(count: int) -> list[str]:
    """The roles of `count` Pools, in index order (1 -> ["pool"])."""
    return [pool(i) for i in range(max(1, count))]


def parse(text: str) -> Role:
    """The role `text` names; ValueError for anything that is not a role."""
    kind, sep, name = text.partition(":") if isinstance(text, str) else ("", "", "")
    if kind in SINGLETONS and not sep:
        return Role(kind)
    if kind == PACER and sep and name and name == name.lower() and ":" not in name and name.strip() == name:
        return Role(kind, name)
    if kind == COALESCER and sep and name.isdigit() and name.isascii() and str(int(name)) == name:
        return Role(kind, name)
    if kind == POOL and sep and name.isdigit() and name.isascii() and str(int(name)) == name and int(name) > 0:
        return Role(kind, name)
    raise ValueError(
        f"not a role: {text!r} (roles: {', '.join(SINGLETONS)}, pool:<n>, pacer:<account>, coalescer:<shard>)"
    )


def kind(text: str) -> str:
    """The kind of a role string ("pacer:openai" -> "pacer"), without checking the rest."""
    return text.partition(":")[0]


def is_pacer(text: str) -> bool:
    return isinstance(text, str) and text.startswith(PACER + ":")


def is_coalescer(text: str) -> bool:
    return isinstance(text, str) and text.startswith(COALESCER + ":")


def is_pool(text: str) -> bool:
    """ "pool" or "pool:<n>" (n >= 1), without raising for anything else."""
    try:
        return parse(text).kind == POOL
    except ValueError:
        return False


def pool_index(text: str) -> int:
    """The index of a Pool role ("pool" -> 0, "pool:2" -> 2); ValueError for any other."""
    role = parse(text)
    if role.kind != POOL:
        raise ValueError(f"{text!r} is not a pool role")
    return int(role.name) if role.name else 0


def pacer_account(text: str) -> str:
    """The account a Pacer role guards, lower case ("pacer:perplexity" -> "perplexity")."""
    role = parse(text)
    if role.kind != PACER:
        raise ValueError(f"{text!r} is not a pacer role")
    return role.name


def coalescer_shard(text: str) -> int:
    """The shard a Coalescer role owns ("coalescer:1" -> 1)."""
    return parse(text).shard


def children(providers: Mapping[str, ProviderConfig], shards: int, pool_count: int = 1) -> list[str]:
    """Every role the Supervisor creates (all but itself), for the providers configured
    (`settings.providers`: each names its `account`), `shards` key shards and
    `pool_count` Pools."""
    pacers = dict.fromkeys(pacer(p.account) for p in providers.values())  # one per account, in order
    return [METRICS, *pools(pool_count), THREADS, *pacers, *(coalescer(i) for i in range(shards))]
