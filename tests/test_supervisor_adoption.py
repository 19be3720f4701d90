"""A replacement Supervisor adopts its predecessor's actors (actors/supervisor.py; docs/
reliability.md, "The Supervisor is watched and replaced"), driven without an actor system:
a `SupervisorActor` whose Thespian calls are recorded, wired as run.py's keeper wires it,
fed the Ready answers the adopted actors would give.

- the keeper's directory may be a second old: the predecessor recreated the Pool since.
  The adopted actors' previous directory names the live Pool, which is adopted (no
  second Pool is created), the dead one's loss announced, and nothing is recreated at
  the adoption deadline;
- a live actor that some adopted actor names for a role whose actor has answered already
  is a second actor of that role: it is stopped and its loss announced;
- an adopted actor that never answers is stopped (it may be alive but stalled) before it
  is recreated.
The real processes: tests/test_crashes.py
`test_a_replaced_supervisor_adopts_every_actor_and_leaves_no_second_one`.
"""

from __future__ import annotations

import pytest
from thespian.actors import ActorExitRequest

from actors import addressing
from actors.supervisor import AdoptDeadline
from protocols import messages as m
from protocols import roles
from tests.recorded_supervisor import RecordedSupervisor

pytestmark = pytest.mark.unit

ROLES = ["metrics", "pool", "threads", "pacer:simulated", "coalescer:0", "coalescer:1"]


def old_directory(**changes: str) -> dict[str, str]:
    """The predecessor's directory: each role at 127.0.0.1:2000+i, `changes` (role_with_
    underscores=address) applied."""
    directory = {role: f"127.0.0.1:{2000 + i}" for i, role in enumerate(ROLES)}
    directory[roles.SUPERVISOR] = "127.0.0.1:1800"
    for key, address in changes.items():
        directory[key.replace("_", ":")] = address
    return directory


def adopted_by_keeper(keeper_directory: dict) -> RecordedSupervisor:
    sup = RecordedSupervisor()
    sup.on_wire(m.Wire(roles.SUPERVISOR, keeper_directory, sup.settings.to_wire()))
    return sup


def sent_to(sup, address: str, kind) -> list:
    return [msg for to, msg in sup.sent if to == address and isinstance(msg, kind)]


def test_a_pool_recreated_after_the_keeper_looked_is_adopted_not_created_twice():
    keeper = old_directory()  # names the Pool that died: 127.0.0.1:2001
    last = old_directory(pool="127.0.0.1:2901")  # the predecessor recreated it, wired everyone
    sup = adopted_by_keeper(keeper)
    assert sup.created == [], "a Supervisor wired with a whole directory creates nothing"
    for role in ROLES:
        if role != "pool":  # the dead Pool never answers
            sup.on_message(m.Ready(role, keeper[role], 100, last), None, 0.0)
    assert sent_to(sup, "127.0.0.1:2901", m.Wire), "the live Pool the actors knew was not wired"
    assert sup.addresses.get("pool") is None
    sup.on_message(m.Ready("pool", "127.0.0.1:2901", 200), None, 0.0)

    assert sup.addresses["pool"] == "127.0.0.1:2901" and sup.pids["pool"] == 200
    assert addressing.to_string(sup.children["pool"]) == "127.0.0.1:2901"
    assert sup._state()["ready"] is False  # its hub: HubReady answers the next Wire
    assert sent_to(sup, "127.0.0.1:2001", ActorExitRequest), "the keeper's Pool was not stopped"
    lost = sent_to(sup, keeper["pacer:simulated"], m.MemberLost)
    assert [(x.role, x.incarnation) for x in lost] == [("pool", "127.0.0.1:2001")]
    assert sent_to(sup, "127.0.0.1:2901", m.Wire)[-1].directory["pool"] == "127.0.0.1:2901"

    sup.on_message(AdoptDeadline(), None, 0.0)
    assert sup.created == [], "a role was created although its live actor was adopted"
    assert sorted(sup.addresses) == sorted(ROLES)


def test_a_candidate_of_a_role_that_answered_already_is_stopped_and_its_loss_announced():
    keeper = old_directory()
    last = old_directory(pacer_simulated="127.0.0.1:2902")  # an older, a newer: both answer
    sup = adopted_by_keeper(keeper)
    for role in ROLES:
        sup.on_message(m.Ready(role, keeper[role], 100, last), None, 0.0)
    sup.on_message(m.Ready("pacer:simulated", "127.0.0.1:2902", 300), None, 0.0)

    assert sup.addresses["pacer:simulated"] == keeper["pacer:simulated"], "the answered actor lost its role"
    assert sent_to(sup, "127.0.0.1:2902", ActorExitRequest), "the second Pacer was not stopped"
    lost = sent_to(sup, keeper["coalescer:0"], m.MemberLost)
    assert [(x.role, x.incarnation) for x in lost] == [("pacer:simulated", "127.0.0.1:2902")]
    # a late Ready of the stopped one changes nothing
    sup.on_message(m.Ready("pacer:simulated", "127.0.0.1:2902", 300), None, 0.0)
    assert sup.addresses["pacer:simulated"] == keeper["pacer:simulated"]


def test_an_adopted_actor_that_never_answers_is_stopped_before_it_is_recreated():
    keeper = old_directory()
    sup = adopted_by_keeper(keeper)
    for role in ROLES:
        if role != "metrics":
            sup.on_message(m.Ready(role, keeper[role], 100, keeper), None, 0.0)
    sup.on_message(AdoptDeadline(), None, 0.0)

    assert sent_to(sup, keeper["metrics"], ActorExitRequest), "a stalled Metrics would run on beside the new one"
    assert sup.created == ["MetricsActor"]


def test_an_adopted_pools_hub_counts_only_from_the_actor_that_plays_the_role():
    keeper = old_directory()
    last = old_directory(pool="127.0.0.1:2901")
    sup = adopted_by_keeper(keeper)
    for role in ROLES:
        sup.on_message(m.Ready(role, keeper[role], 100, last), None, 0.0)  # the keeper's Pool answers first
    sup.on_message(m.HubReady("127.0.0.1", 7000, "pool"), addressing.from_string(keeper["pool"]), 0.0)
    candidate = addressing.from_string("127.0.0.1:2901")
    sup.on_message(m.HubReady("127.0.0.1", 7001, "pool"), candidate, 0.0)  # before its Ready
    assert sup.hubs["pool"] == ["127.0.0.1", 7000]
    sup.on_message(m.Ready("pool", "127.0.0.1:2901", 200), None, 0.0)  # a second Pool: stopped
    sup.on_message(m.HubReady("127.0.0.1", 7002, "pool"), candidate, 0.0)  # late
    assert sup.hubs["pool"] == ["127.0.0.1", 7000]
    assert sup._state()["ready"] is True
