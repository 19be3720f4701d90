"""`CoalescerLogic.set_flags`: the operator's live flags, validated by protocols/settings.py
`flags_from` — for the actor's admin command and for the simulator's `set_flags` alike."""

from __future__ import annotations

import pytest

from actors.coalescer_logic import CoalescerLogic
from protocols.settings import CoalescerFlags
from sim.harness import Simulation, SimulationError

pytestmark = pytest.mark.unit


def test_set_flags_changes_the_flags_named():
    logic = CoalescerLogic(me="coalescer:0")
    logic.set_flags({"coalesce_enabled": False, "error_ttl_s": 1})
    assert logic.flags == CoalescerFlags(coalesce_enabled=False, stream_fanout_enabled=True, error_ttl_s=1.0)


@pytest.mark.parametrize(
    "changes",
    [{"coalesce_enabled": "no"}, {"error_ttl_s": -1}, {"nope": True}],
    ids=["not-bool", "negative", "unknown"],
)
def test_a_bad_flag_changes_nothing(changes):
    logic = CoalescerLogic(me="coalescer:0")
    with pytest.raises(ValueError):
        logic.set_flags({"stream_fanout_enabled": False, **changes})
    assert logic.flags == CoalescerFlags()


def test_the_simulator_validates_a_flag_change_as_the_actor_does():
    sim = Simulation(seed=1)
    sim.set_flags(at=0.0, coalesce_enabled="off")
    with pytest.raises(SimulationError, match="coalesce_enabled must be true or false"):
        sim.run()
