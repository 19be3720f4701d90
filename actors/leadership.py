"""Which host leads a cluster with a standby leader: the ordered list of leader candidates.

`SLUICE_JOIN=A:19500,B:19500` (the same on every host, the candidates' own included) names
the hosts that may lead, in order. A host whose own `SLUICE_ACTOR_HOST:SLUICE_ACTOR_PORT`
is in the list is a candidate; any other host is a member that follows whichever candidate
leads. With one address that is not the host's own (`SLUICE_JOIN=A:19500`) nothing changes
from a plain member: it waits for that leader to come back (docs/scale-out.md).

Plain decisions, no Thespian here: the caller passes `probe(address) -> Probe`, which asks
that host's actor system whether it answers and whether it leads (actors/system.py
`probe_leader`). Two rules, the same on every host, so every host reaches the same answer:

- **At start** (`at_start`): join a candidate that already leads (the first in list order,
  if several claim it); with none leading, a candidate leads once every candidate *before*
  it in the list is unreachable, and waits (None) while an earlier one answers without
  leading (it is starting too, and decides first). So a leader that died and is restarted
  joins the candidate that took over, as a member; it does not take the lead back.
- **After the leader is lost** (`after_loss`): again a candidate that already leads wins
  (a split healed, or a host that was slower to notice the loss); with none leading, the
  next candidate after the lost one, in list order (wrapping round), is the new leader.
  Every member follows it; that candidate promotes itself. If it is dead too, the hosts
  following it lose it in turn and move on to the one after it.

`step_down` is the rule for two leaders at once (a partition healed, or a leader that
stalled past the loss timers and woke up): the newer leader stays. Each leader advertises
its **term**: 1 for a leader chosen at start, its lost leader's term + 1 for a candidate
that took over. The one with the lower term steps down (it is the one the others gave up
on, and the one that can see the other: docs/scale-out.md); with equal terms (two
partitions that each promoted once), the one later in the list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Probe(NamedTuple):
    reachable: bool  # its actor system answered
    leads: bool  # and it says it leads (its sluice.leader capability)
    term: int = 0  # the term it leads in (its sluice.term capability)


UNREACHABLE = Probe(False, False)


def candidates_of(join: str | None) -> list[str]:
    """The leader candidates named by SLUICE_JOIN's normalized value, in order."""
    return [address for address in (join or "").split(",") if address]


class Leadership:
    def __init__(self, candidates: list[str], me: str):
        if not candidates:
            raise ValueError("no leader candidates")
        self.candidates, self.me = list(candidates), me

    @property
    def is_candidate(self) -> bool:
        return self.me in self.candidates

    @property
    def standby(self) -> bool:
        """Whether the lead can move: more than one candidate, or this host one of them.
        False for a plain member of one fixed leader (SLUICE_JOIN=A:19500)."""
        return len(self.candidates) > 1 or self.is_candidate

    def others(self) -> list[str]:
        return [address for address in self.candidates if address != self.me]

    def at_start(self, probe: Callable[[str], Probe]) -> str | None:
        """The candidate to join, `self.me` to lead, or None: ask again shortly."""
        probes = {address: probe(address) for address in self.others()}
        leading = [address for address, p in probes.items() if p.leads]
        if leading:
            return leading[0]
        if not self.is_candidate:
            return None  # a member waits for a candidate to lead
        earlier = self.candidates[: self.candidates.index(self.me)]
        if all(not probes[address].reachable for address in earlier):
            return self.me
        return None

    def after_loss(self, lost: str, probe: Callable[[str], Probe]) -> str:
        """Whom to follow (or `self.me`: lead) now that `lost` no longer answers."""
        for address in self.others():
            if address != lost and probe(address).leads:
                return address
        return self.next_after(lost)

    def next_after(self, lost: str) -> str:
        """The candidate after `lost` in list order, wrapping round (the first one when
        `lost` is not a candidate)."""
        if lost not in self.candidates:
            return self.candidates[0]
        return self.candidates[(self.candidates.index(lost) + 1) % len(self.candidates)]

    def step_down(self, other_leader: str, other_term: int, my_term: int) -> bool:
        """Whether this host, leading in `my_term`, must step down for `other_leader`,
        which leads too, in `other_term`."""
        if other_leader not in self.candidates:
            return False  # not one of ours: a misconfigured host; say so, keep leading
        if other_term != my_term:
            return other_term > my_term
        if not self.is_candidate:
            return True
        return self.candidates.index(other_leader) < self.candidates.index(self.me)
