"""Coalescing and fan-out on the real system: identical in-flight requests share one
upstream call, every client gets the same stream, and cancelling is refcounted."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import SSEClient, chat_body, data_events, get_json, stream_chat, wait_until

pytestmark = pytest.mark.integration


def calls_for(gateway, text: str) -> list[dict]:
    stats = get_json(gateway.sim + "/stats")[1]
    return [r for r in stats["requests"] if text in json.dumps(r["body"])]


def cancellations_for(gateway, text: str) -> list[dict]:
    stats = get_json(gateway.sim + "/stats")[1]
    ids = {r["call_id"] for r in calls_for(gateway, text)}
    return [c for c in stats["cancellations"] if c["call_id"] in ids]


def burst(url: str, body: dict, n: int, headers: dict | None = None):
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: stream_chat(url, body, headers), range(n)))


def deltas(events) -> list[str]:
    return [d["delta"] for d in data_events(events) if d["type"] == "delta"]


def test_burst_of_50_identical_requests_makes_one_upstream_call(gateway):
    text = f"burst {uuid.uuid4().hex}"
    # ~1 s in flight: on a loaded machine the last of the 50 threads still finds it running
    # (a request after the flight's end rightly starts another call).
    body = chat_body(text + "\n#sim ttft_ms=300 tokens=8 token_interval_ms=100")
    results = burst(gateway.url + "/api/chat", body, 50)
    assert [status for status, _, _ in results] == [200] * 50
    streams = [deltas(events) for _, _, events in results]
    assert all(s == streams[0] for s in streams) and len(streams[0]) == 8
    assert all(data_events(events)[-1]["type"] == "done" for _, _, events in results)
    roles = sorted(data_events(events)[0]["role"] for _, _, events in results)
    assert roles == ["follower"] * 49 + ["leader"]
    assert len(calls_for(gateway, text)) == 1


def test_opted_out_and_tool_requests_are_never_coalesced(gateway):
    text = f"solo {uuid.uuid4().hex}"
    body = chat_body(text + "\n#sim ttft_ms=200 tokens=2")
    results = burst(gateway.url + "/api/chat", body, 3, headers={"X-Sluice-Coalesce": "off"})
    assert all(status == 200 for status, _, _ in results)
    assert len(calls_for(gateway, text)) == 3
    text = f"tools {uuid.uuid4().hex}"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    results = burst(gateway.url + "/api/chat", chat_body(text + "\n#sim ttft_ms=200 tokens=2", tools=tools), 3)
    assert all(status == 200 for status, _, _ in results)
    assert len(calls_for(gateway, text)) == 3


def _open(gateway, body) -> SSEClient:
    client = SSEClient(gateway.url + "/api/chat", body)
    while client.next()[1].get("type") != "delta":
        pass
    return client


def test_a_follower_leaving_does_not_disturb_the_others(gateway):
    text = f"leave {uuid.uuid4().hex}"
    body = chat_body(text + "\n#sim tokens=60 token_interval_ms=15")
    leader, follower, other = (_open(gateway, body) for _ in range(3))
    try:
        leader.close()  # the leader leaves: the stream is the key's, not the leader's
        follower.close()
        rest = data_events(other.read_all())
        assert rest[-1]["type"] == "done"
        assert len([d for d in data_events(other.events) if d["type"] == "delta"]) == 60
    finally:
        for client in (leader, follower, other):
            client.close()
    assert len(calls_for(gateway, text)) == 1
    assert cancellations_for(gateway, text) == []


def test_the_last_subscriber_leaving_aborts_the_upstream_call(gateway):
    text = f"all-leave {uuid.uuid4().hex}"
    body = chat_body(text + "\n#sim tokens=500 token_interval_ms=20")
    clients = [_open(gateway, body) for _ in range(3)]
    for client in clients[:2]:
        client.close()
    assert cancellations_for(gateway, text) == []  # someone still listens
    clients[2].close()
    wait_until(lambda: cancellations_for(gateway, text), timeout=5, message="the upstream abort")
    assert len(calls_for(gateway, text)) == 1


def test_a_failure_is_shared_within_the_error_ttl(gateway):
    text = f"fail {uuid.uuid4().hex}"
    body = chat_body(text + "\n#sim fail=500 ttft_ms=200")
    results = burst(gateway.url + "/api/chat", body, 5)
    codes = {data_events(events)[-1]["code"] for _, _, events in results}
    assert codes == {"upstream_5xx"}
    again = stream_chat(gateway.url + "/api/chat", body)  # within the 2 s TTL: no new call
    assert data_events(again[2])[-1]["code"] == "upstream_5xx"
    assert len(calls_for(gateway, text)) == 3  # one flight: its UPSTREAM_MAX_ATTEMPTS tries, nothing after
