"""The Supervisor's handling of hosts that join and leave the Convention (actors/supervisor.py),
driven without an actor system: a `SupervisorActor` whose Thespian calls (createActor,
send, timers) are recorded, fed the messages Thespian and the children would send it
(Ready, ActorSystemConventionUpdate, ChildActorExited). The real Convention is exercised by
tests/test_scale_out.py; this checks the order of what the Supervisor says and where it
puts the shards, which the processes cannot show deterministically.

- a lost member's deaths are announced by the LostMembers rule (actors/member_loss.py):
  only once the shards recreated for it are up (Ready), after the Wire that names them;
- the shards stay evenly spread (actors/placement.py `spread`) after any joins and losses,
  a member giving a shard to a newcomer included, every move through the hand-off.
"""

from __future__ import annotations

import itertools
import random

import pytest
from thespian.actors import ActorSystemConventionUpdate, ChildActorExited

from actors import addressing, placement
from protocols import messages as m
from protocols import roles
from tests.recorded_supervisor import LEADER_IP, RecordedSupervisor

pytestmark = pytest.mark.unit


class MembersSupervisor(RecordedSupervisor):
    """Wired at once with `shards` shards, as the leader's Supervisor starts."""

    def __init__(self, shards: int):
        super().__init__(shards)
        self.on_wire(m.Wire(roles.SUPERVISOR, {}, self.settings.to_wire()))


def member(n: int) -> str:
    return f"127.0.0.{n}:19500"


def convention_update(host: str, added: bool) -> ActorSystemConventionUpdate:
    ip, _, port = host.rpartition(":")
    caps = placement.capabilities(ip, int(port), f"{LEADER_IP}:1900", 1)
    return ActorSystemConventionUpdate(addressing.from_string(host), caps, added)


def ip_of(address: str) -> str:
    return address.rpartition(":")[0]


def answer(sup: RecordedSupervisor, dead_ips: set[str] = frozenset()) -> None:
    """Every child that was sent a Wire and has not answered it yet (and whose host lives)
    answers Ready."""
    while waiting := [
        (role, address)
        for role, child in sup.children.items()
        if (address := addressing.to_string(child)) != sup.addresses.get(role)
        and ip_of(address) not in dead_ips
        and any(to == address and isinstance(msg, m.Wire) for to, msg in sup.sent)
    ]:
        for role, address in waiting:
            sup.on_message(m.Ready(role, address, 4242), None, 0.0)


def lost_announced(sup: RecordedSupervisor, since: int = 0) -> list[tuple[str, m.MemberLost]]:
    return [(to, msg) for to, msg in sup.sent[since:] if isinstance(msg, m.MemberLost)]


def host_of(sup: RecordedSupervisor, role: str) -> str | None:
    """The member host `role`'s actor runs on, by its address (None: the leader)."""
    ip = ip_of(sup.addresses[role])
    return None if ip == LEADER_IP else member(int(ip.rpartition(".")[2]))


def test_a_lost_members_shards_are_up_before_its_losses_are_announced():
    sup = MembersSupervisor(shards=2)
    answer(sup)
    sup.on_system(convention_update(member(2), True), None)
    answer(sup)
    assert sup._state()["members"] == {member(2): {"pools": ["pool:1"], "shards": ["coalescer:1"]}}
    sup.on_message(m.Ready("coalescer:1", sup.addresses["coalescer:1"], 4242), None, 0.0)
    dead_shard, dead_pool = sup.addresses["coalescer:1"], sup.addresses["pool:1"]
    assert ip_of(dead_shard) == "127.0.0.2"

    lost_at = len(sup.sent)
    sup.on_system(convention_update(member(2), False), None)
    # Noticed at once (the directory drops it), but nobody hears MemberLost before the
    # shard recreated for it on the leader is up.
    assert sup._state()["members"] == {}
    assert lost_announced(sup, lost_at) == [], "announced before the replacement shard was Ready"
    replacement = addressing.to_string(sup.children["coalescer:1"])
    assert ip_of(replacement) == LEADER_IP

    ready_at = len(sup.sent)
    sup.on_message(m.Ready("coalescer:1", replacement, 4343), None, 0.0)
    pacer = sup.addresses["pacer:simulated"]
    to_pacer = [msg for to, msg in sup.sent[ready_at:] if to == pacer]
    # The Pacer is wired with the new shard's address first, then hears both losses.
    assert isinstance(to_pacer[0], m.Wire) and to_pacer[0].directory["coalescer:1"] == replacement
    assert {(msg.role, msg.incarnation) for msg in to_pacer[1:]} == {
        ("coalescer:1", dead_shard),
        ("pool:1", dead_pool),
    }
    assert all(isinstance(msg, m.MemberLost) for msg in to_pacer[1:])
    # The other shard hears both too; the recreated one only of the Pool.
    other = [msg.role for to, msg in lost_announced(sup, ready_at) if to == sup.addresses["coalescer:0"]]
    assert sorted(other) == ["coalescer:1", "pool:1"]
    assert [msg.role for to, msg in lost_announced(sup, ready_at) if to == replacement] == ["pool:1"]


def test_a_lost_member_with_pools_only_is_announced_at_once():
    # One shard stays on the leader: nothing is recreated, nothing to wait for.
    sup = MembersSupervisor(shards=1)
    answer(sup)
    sup.on_system(convention_update(member(2), True), None)
    answer(sup)
    dead_pool = sup.addresses["pool:1"]
    lost_at = len(sup.sent)
    sup.on_system(convention_update(member(2), False), None)
    announced = lost_announced(sup, lost_at)
    assert {(to, msg.role, msg.incarnation) for to, msg in announced} == {
        (sup.addresses["pacer:simulated"], "pool:1", dead_pool),
        (sup.addresses["coalescer:0"], "pool:1", dead_pool),
    }


def test_joins_in_turn_spread_the_shards_evenly_a_member_giving_to_the_newcomer():
    sup = MembersSupervisor(shards=6)
    answer(sup)
    sup.on_system(convention_update(member(2), True), None)
    answer(sup)
    assert sup._state()["members"][member(2)]["shards"] == ["coalescer:3", "coalescer:4", "coalescer:5"]
    for old in list(sup.retiring):  # the leader's old actors finish and stop
        sup.on_system(ChildActorExited(addressing.from_string(old)), None)
    moved_at = len(sup.sent)
    sup.on_system(convention_update(member(3), True), None)
    answer(sup)
    state = sup._state()
    assert [len(info["shards"]) for info in state["members"].values()] == [2, 2]
    assert len([r for r in sup.children if roles.is_coalescer(r) and host_of(sup, r) is None]) == 2
    # One shard went member -> member, through the hand-off: its old actor (on 127.0.0.2)
    # heard ShardMoved and retires; its end is announced like any shard's death.
    moves = [msg for to, msg in sup.sent[moved_at:] if isinstance(msg, m.ShardMoved) and to == msg.predecessor]
    from_member = [msg for msg in moves if ip_of(msg.predecessor) == "127.0.0.2"]
    assert len(moves) == 2 and len(from_member) == 1, moves
    assert ip_of(from_member[0].successor) == "127.0.0.3"
    assert state["retiring"] == sorted((msg.role for msg in moves), key=roles.coalescer_shard)
    sup.on_system(ChildActorExited(addressing.from_string(from_member[0].predecessor)), None)
    assert sup._state()["retiring"] == [msg.role for msg in moves if msg is not from_member[0]]


def test_a_shard_that_could_not_move_yet_moves_once_everyone_is_up():
    # 127.0.0.3 joins while 127.0.0.2's three new shards have not answered: the one it
    # should take from 127.0.0.2 is still moving there, so it moves once all are up.
    sup = MembersSupervisor(shards=6)
    answer(sup)
    sup.on_system(convention_update(member(2), True), None)
    sup.on_system(convention_update(member(3), True), None)
    assert [len(info["shards"]) for info in sup._state()["members"].values()] == [3, 1]
    answer(sup)
    assert [len(info["shards"]) for info in sup._state()["members"].values()] == [2, 2]
    assert all(host_of(sup, r) == sup.remote.get(r) for r in sup.children if roles.is_coalescer(r))


def test_a_member_lost_with_a_retiring_shard_and_one_moving_away():
    # 127.0.0.2 holds 3 of 6; 127.0.0.3 joins: one shard moves 2 -> 3, and 2 is lost
    # before 3's new actor answers. The moving shard's new actor takes over (its old one
    # died): announced once it is up; 2's other shards are recreated where spread says.
    sup = MembersSupervisor(shards=6)
    answer(sup)
    sup.on_system(convention_update(member(2), True), None)
    answer(sup)
    sup.on_system(convention_update(member(3), True), None)
    moving = {role: previous for role, (_, previous, host) in sup.moving.items() if host == member(2)}
    assert len(moving) == 1
    [(role, previous)] = moving.items()
    lost_at = len(sup.sent)
    sup.on_system(convention_update(member(2), False), None)
    assert lost_announced(sup, lost_at) == []
    answer(sup, dead_ips={"127.0.0.2"})
    announced = {(msg.role, msg.incarnation) for _, msg in lost_announced(sup, lost_at)}
    assert (role, previous) in announced
    assert host_of(sup, role) == member(3) and sup.moving == {}
    counts = [len(info["shards"]) for info in sup._state()["members"].values()]
    assert counts == [3] and len([r for r in sup.addresses if roles.is_coalescer(r) and host_of(sup, r) is None]) == 3


@pytest.mark.parametrize("seed", range(40))
def test_any_joins_and_losses_leave_every_shard_up_on_a_live_host_evenly(seed):
    """Members join and are lost at random, the children answer (or not yet) in between,
    moved shards' old actors retire: once everyone answered, every shard runs where the
    Supervisor says, on a live host, evenly spread, and every dead shard incarnation was
    announced."""
    rng = random.Random(seed)
    sup = MembersSupervisor(shards=rng.randint(1, 9))
    answer(sup)
    live: list[str] = []
    dead_ips: set[str] = set()
    next_host = itertools.count(2)
    incarnations: set[tuple[str, str]] = set()
    for _ in range(25):
        incarnations |= {(r, a) for r, a in sup.addresses.items() if roles.is_coalescer(r)}
        action = rng.random()
        if live and action < 0.35:
            gone = rng.choice(live)
            live.remove(gone)
            dead_ips.add(ip_of(gone))
            known = [addressing.to_string(a) for a in sup.children.values()] + list(sup.retiring)
            sup.on_system(convention_update(gone, False), None)
            # Thespian's leader then reports every actor it had placed there as exited.
            for address in known:
                if ip_of(address) == ip_of(gone):
                    sup.on_system(ChildActorExited(addressing.from_string(address)), None)
        elif action < 0.7:
            host = member(next(next_host))
            live.append(host)
            sup.on_system(convention_update(host, True), None)
        else:
            for old in list(sup.retiring):  # an idle old actor stops
                sup.on_system(ChildActorExited(addressing.from_string(old)), None)
        if rng.random() < 0.6:
            answer(sup, dead_ips)
    answer(sup, dead_ips)
    incarnations |= {(r, a) for r, a in sup.addresses.items() if roles.is_coalescer(r)}
    assert sup.moving == {}
    shards = [r for r in sup.children if roles.is_coalescer(r)]
    assert all(host_of(sup, r) in [None, *live] for r in shards)
    assert all(host_of(sup, r) == sup.remote.get(r) for r in shards), "the directory names where it runs"
    per_host = [sum(1 for r in shards if host_of(sup, r) == host) for host in [None, *live]]
    share = len(shards) // (1 + len(live))
    assert all(share <= n <= share + 1 for n in per_host), per_host
    # Every shard incarnation on a lost host was announced (they held flights and leases).
    announced = {(msg.role, msg.incarnation) for _, msg in lost_announced(sup)}
    on_dead = {(r, a) for r, a in incarnations if ip_of(a) in dead_ips}
    assert on_dead <= announced, on_dead - announced
