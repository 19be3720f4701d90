"""The key limits the Metrics actor holds for every edge worker (actors/key_limits.py):
the one-process verdicts of edge/api_keys.py, counted across edges, with what a dead edge
held released. Driven directly, with an injected clock."""

from __future__ import annotations

import json

import pytest

from actors.key_limits import KeyLimits
from edge.api_keys import hash_key

pytestmark = pytest.mark.unit


@pytest.fixture
def limits(tmp_path):
    path = tmp_path / "keys.json"
    keys = [
        {"id": "a", "sha256": hash_key("sk-a"), "rpm": 2, "concurrency": 1},
        {"id": "b", "sha256": hash_key("sk-b")},
    ]
    path.write_text(json.dumps({"keys": keys}))
    return KeyLimits(str(path), clock=lambda: 100.0)


def finish(edge: str, key: str = "a", outcome: str = "done", tokens: int = 5) -> dict:
    return {"kind": "key_finish", "key_id": key, "outcome": outcome, "tokens": tokens, "edge_id": edge}


def test_limits_count_every_edge(limits):
    assert limits.admit("a", "p", "m", "edge-1") is None
    assert limits.admit("a", "p", "m", "edge-2")["code"] == "rate_limit_exceeded"  # concurrency 1, held by edge-1
    limits.ingest(finish("edge-1"))
    assert limits.admit("a", "p", "m", "edge-2") is None
    limits.ingest(finish("edge-2"))
    denial = limits.admit("a", "p", "m", "edge-1")  # the third request this minute: rpm 2
    assert denial["status"] == 429 and "requests/minute" in denial["message"]


def test_a_dead_edges_requests_are_finished_and_a_finish_is_counted_once(limits):
    assert limits.admit("a", "p", "m", "edge-1") is None
    assert limits.edge_lost("edge-1") == 1
    limits.ingest(finish("edge-1"))  # its late record changes nothing
    assert limits.state()["usage"]["a"]["open_streams"] == 0
    assert 'sluice_key_requests_total{key_id="a",outcome="edge_lost"} 1' in limits.prometheus()
    assert 'outcome="done"' not in limits.prometheus()


def test_auth_failures_and_malformed_records(limits):
    limits.ingest({"kind": "key_auth_failure", "reason": "missing"})
    limits.ingest({"kind": "key_auth_failure", "reason": "bogus"})
    limits.ingest({"kind": "key_finish", "key_id": "b", "edge_id": "edge-1", "tokens": "many", "outcome": "done"})
    assert 'sluice_key_auth_failures_total{reason="missing"} 1' in limits.prometheus()
    assert limits.admit("b", "p", "m", "edge-1") is None
    assert limits.admit("nobody", "p", "m", "edge-1")["status"] == 401
