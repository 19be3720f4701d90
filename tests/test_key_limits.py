"""The key limits the Metrics actor holds for every edge process (actors/key_limits.py):
the one-process verdicts of edge/api_keys.py, counted across edges (workers and hosts),
with what a dead edge held released. No keys file: each ask carries the key's entry from
the asking edge's own file. Driven directly, with an injected clock."""

from __future__ import annotations

import pytest

from actors.key_limits import KeyLimits
from edge.api_keys import ClientKey, KeysFileError

pytestmark = pytest.mark.unit

A = ClientKey("a", rpm=2, concurrency=1).to_wire()
B = ClientKey("b").to_wire()


@pytest.fixture
def limits():
    return KeyLimits(clock=lambda: 100.0)


def finish(edge: str, key: str = "a", outcome: str = "done", tokens: int = 5) -> dict:
    return {"kind": "key_finish", "key_id": key, "outcome": outcome, "tokens": tokens, "edge_id": edge}


def test_limits_count_every_edge(limits):
    assert limits.admit("a", "p", "m", "edge-1", A) is None
    assert limits.admit("a", "p", "m", "edge-2", A)["code"] == "rate_limit_exceeded"  # concurrency 1, held by edge-1
    limits.ingest(finish("edge-1"))
    assert limits.admit("a", "p", "m", "edge-2", A) is None
    limits.ingest(finish("edge-2"))
    denial = limits.admit("a", "p", "m", "edge-1", A)  # the third request this minute: rpm 2
    assert denial["status"] == 429 and "requests/minute" in denial["message"]


def test_the_entry_asked_with_is_in_force_and_usage_carries_over(limits):
    assert limits.admit("a", "p", "m", "edge-1", A) is None
    wider = ClientKey("a", rpm=2, concurrency=2).to_wire()  # an edge whose file gives "a" 2 streams
    assert limits.admit("a", "p", "m", "edge-2", wider) is None
    assert limits.admit("a", "p", "m", "edge-2", wider)["code"] == "rate_limit_exceeded"  # rpm 2: counted across
    assert limits.state()["usage"]["a"]["open_streams"] == 2


def test_models_are_checked_against_the_entry(limits):
    only = ClientKey("a", models=("simulated/*",)).to_wire()
    assert limits.admit("a", "simulated", "sim-1", "edge-1", only) is None
    denial = limits.admit("a", "openai", "gpt-4o", "edge-1", only)
    assert (denial["status"], denial["code"]) == (403, "model_not_allowed")


def test_no_entry_or_a_bad_one_is_503_never_admitted(limits):
    for entry in (None, {"rpm": 0}, {"rpm": 1, "burst": 2}, {"models": "*"}, "a"):
        denial = limits.admit("a", "p", "m", "edge-1", entry)
        assert (denial["status"], denial["code"]) == (503, "key_limits_unavailable"), entry
    assert limits.state()["usage"] == {}


def test_the_wire_form_round_trips_and_is_checked_like_the_file():
    key = ClientKey("team-a", rpm=60, tpm=1000, concurrency=3, models=("simulated/*", "gpt-4o*"))
    assert ClientKey.from_wire("team-a", key.to_wire()) == key
    assert ClientKey.from_wire("b", {}) == ClientKey("b")
    with pytest.raises(KeysFileError, match="positive integer"):
        ClientKey.from_wire("b", {"concurrency": True})
    with pytest.raises(KeysFileError, match="key id"):
        ClientKey.from_wire("no spaces", {})


def test_a_dead_edges_requests_are_finished_and_a_finish_is_counted_once(limits):
    assert limits.admit("a", "p", "m", "edge-1", A) is None
    assert limits.edge_lost("edge-1") == 1
    limits.ingest(finish("edge-1"))  # its late record changes nothing
    assert limits.state()["usage"]["a"]["open_streams"] == 0
    assert 'sluice_key_requests_total{key_id="a",outcome="edge_lost"} 1' in limits.prometheus()
    assert 'outcome="done"' not in limits.prometheus()


def test_auth_failures_and_malformed_records(limits):
    assert limits.prometheus() == ""  # nothing counted here yet: no sluice_key_* lines
    limits.ingest({"kind": "key_auth_failure", "reason": "missing"})
    limits.ingest({"kind": "key_auth_failure", "reason": "bogus"})
    limits.ingest({"kind": "key_finish", "key_id": "b", "edge_id": "edge-1", "tokens": "many", "outcome": "done"})
    assert 'sluice_key_auth_failures_total{reason="missing"} 1' in limits.prometheus()
    assert limits.admit("b", "p", "m", "edge-1", B) is None
