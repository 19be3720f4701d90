"""Which host leads a cluster with a standby leader (actors/leadership.py): plain decisions
over probes, the same on every host. The real takeover: tests/test_standby_leader.py."""

from __future__ import annotations

import pytest

from actors import placement
from actors.leadership import UNREACHABLE, Leadership, Probe, candidates_of
from protocols import config

pytestmark = pytest.mark.unit

A, B, C = "10.0.0.1:19500", "10.0.0.2:19500", "10.0.0.3:19500"
UP, LEADING = Probe(True, False), Probe(True, True, 1)


def probes(**states: Probe):
    """probe(address) from {"A": Probe, ...}; an address not named is unreachable."""
    named = {{"A": A, "B": B, "C": C}[k]: v for k, v in states.items()}
    return lambda address: named.get(address, UNREACHABLE)


def test_sluice_join_takes_an_ordered_list_of_candidates():
    settings = config.load({"SLUICE_JOIN": f" {A} , {B}", "SLUICE_CLUSTER_SECRET": "x" * 40})
    assert settings.join == f"{A},{B}"
    assert candidates_of(settings.join) == [A, B]
    assert candidates_of(None) == []


@pytest.mark.parametrize("raw", [f"{A},{A}", f"{A},", f"{A},10.0.0.2", f"{A},0.0.0.0:1"])
def test_a_bad_candidate_list_is_refused_with_its_name(raw):
    with pytest.raises(config.ConfigError, match="SLUICE_JOIN"):
        config.load({"SLUICE_JOIN": raw, "SLUICE_CLUSTER_SECRET": "x" * 40})


def test_a_plain_member_of_one_leader_is_no_standby():
    assert not Leadership([A], B).standby  # SLUICE_JOIN=A on B: as before, wait for A
    assert Leadership([A], A).standby and Leadership([A, B], C).standby and Leadership([A, B], B).standby


def test_at_start_the_first_candidate_that_is_up_leads():
    assert Leadership([A, B], A).at_start(probes()) == A  # nobody else: A leads
    assert Leadership([A, B], B).at_start(probes()) == B  # A is down: B leads
    # A answers but does not lead yet (starting too): B waits for it to decide.
    assert Leadership([A, B], B).at_start(probes(A=UP)) is None
    # A does not wait for B: it comes first.
    assert Leadership([A, B], A).at_start(probes(B=UP)) == A


def test_at_start_a_candidate_that_leads_wins_even_over_an_earlier_one():
    # The old leader A restarted while B leads: A joins B as a member.
    assert Leadership([A, B], A).at_start(probes(B=LEADING)) == B
    assert Leadership([A, B], C).at_start(probes(A=UP, B=LEADING)) == B


def test_at_start_a_member_waits_for_a_leader():
    assert Leadership([A, B], C).at_start(probes()) is None
    assert Leadership([A, B], C).at_start(probes(A=UP, B=UP)) is None
    assert Leadership([A, B], C).at_start(probes(A=LEADING, B=UP)) == A


def test_after_a_loss_every_host_names_the_same_next_leader():
    lost = probes(B=UP, C=UP)
    assert Leadership([A, B, C], B).after_loss(A, lost) == B  # B promotes itself
    assert Leadership([A, B, C], C).after_loss(A, lost) == B  # C follows B
    assert Leadership([A, B], "10.0.0.9:1").after_loss(A, lost) == B  # so does a plain member
    # The list wraps round: after the last candidate, the first.
    assert Leadership([A, B], A).after_loss(B, probes()) == A
    # B is dead too: the hosts that followed it lose it in turn and move on.
    assert Leadership([A, B, C], C).after_loss(B, probes()) == C


def test_after_a_loss_a_candidate_that_already_leads_wins():
    assert Leadership([A, B, C], "10.0.0.9:1").after_loss(A, probes(B=UP, C=LEADING)) == C
    assert Leadership([A, B, C], B).after_loss(A, probes(C=LEADING)) == C  # B does not promote too


def test_of_two_leaders_the_newer_term_stays():
    # A stalled past the loss timers; B took over in term 2; A wakes up in term 1.
    assert Leadership([A, B], A).step_down(B, other_term=2, my_term=1) is True
    assert Leadership([A, B], B).step_down(A, other_term=1, my_term=2) is False
    # Equal terms (each side of a partition promoted once): the later in the list yields.
    assert Leadership([A, B, C], C).step_down(B, other_term=2, my_term=2) is True
    assert Leadership([A, B, C], B).step_down(C, other_term=2, my_term=2) is False
    # A leader that is no candidate of ours: keep leading (and say so).
    assert Leadership([A, B], A).step_down("10.0.0.9:1", other_term=5, my_term=1) is False


def test_an_undecided_host_neither_leads_nor_names_a_leader():
    caps = placement.capabilities("10.0.0.2", 19500, None, 1, undecided=True)
    assert caps[placement.LEADER] is False and placement.CONVENTION_ADDRESS not in caps
    assert placement.member_of(caps) is not None  # a leader that sees it registered places its Pools
