"""UPSTREAM_MAX_DURATION_S: an upstream call that never ends is cut off, whatever it sends.

The read timeout (here 60 s, out of the way) bounds silence and keepalives; it cannot catch
a provider whose frames keep coming: Anthropic's `event: ping` for ever (`fail=pings_only`),
or tokens for ever. The whole-call bound (here 1.5 s) must end such a call: every client of
the flight, coalesced followers too, gets exactly one `upstream_timeout` error after what
was already streamed, the provider sees the call cancelled, and the concurrency slot
(CONCURRENCY=1 per account) is free again for the next request. Before the first byte the
bound is a stall like a read timeout's: retried within the retry deadline, then one error.
Real processes throughout (`Gateway`, the simulated provider). docs/reliability.md.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from tests.support import SSEClient, get_json, request, running_gateway, running_sim, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "max-duration-admin-token"
MAX_DURATION_S = 1.5
DEADLINE_S = 30.0  # no client may wait longer than this for the end of its stream


@pytest.fixture(scope="module")
def gw():
    with ExitStack() as stack:
        sim = stack.enter_context(running_sim())
        # One slot per account: a lease the cut-off call kept would make the next request wait
        # PACER_MAX_WAIT_MS and then be refused (429).
        slot = {"RPS": "100", "BURST": "100", "CONCURRENCY": "1", "RPM": "0"}
        env = {
            "SIMULATED_BASE_URL": sim,
            "ANTHROPIC_BASE_URL": sim,
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_H2C": "1",
            "SLUICE_ADMIN_TOKEN": TOKEN,
            "UPSTREAM_MAX_DURATION_S": str(MAX_DURATION_S),
            "UPSTREAM_READ_TIMEOUT_S": "60",  # pings and tokens keep coming: never the read timeout
            "PACER_MAX_WAIT_MS": "5000",
            "CIRCUIT_FAILURES": "0",  # the tests' timeouts must not open a breaker for the next one
            **{f"{a}_{k}": v for a in ("SIMULATED", "ANTHROPIC") for k, v in slot.items()},
        }
        gateway = stack.enter_context(running_gateway(env))
        gateway.sim = sim
        yield gateway


def calls_for(gw, marker: str) -> list[dict]:
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def pacers_idle(gw) -> bool:
    status, _, raw = request(
        "GET", gw.url + "/api/admin/state?role=pacer", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, raw
    return all(p["in_flight"] == 0 and p["queue_depth"] == 0 for p in json.loads(raw)["results"].values())


def read_stream(gw, path: str, body: dict) -> list[tuple[str, object]]:
    """Every event of one streamed answer but the edge's own pings, read against DEADLINE_S
    (the edge's pings keep a stream that never ends readable: without the bound, a hang)."""
    client = SSEClient(gw.url + path, body, headers={"connection": "close"})
    started = time.monotonic()
    try:
        assert client.status == 200
        while client.next() is not None:
            assert time.monotonic() - started < DEADLINE_S, "the stream did not end"
        return [(name, data) for name, data in client.events if name != "ping"]
    finally:
        client.close()


def cut_off_and_free_again(gw, marker: str, provider: str) -> None:
    """The provider saw every call of `marker` cancelled; the slot serves the next request."""
    wait_until(
        lambda: calls_for(gw, marker) and all(r["outcome"] == "cancelled" for r in calls_for(gw, marker)),
        timeout=15,
        message="the provider saw the call cancelled",
    )
    wait_until(lambda: pacers_idle(gw), timeout=15, message="every Pacer idle")
    text = f"after {marker}"
    status, _, raw = request(
        "POST",
        gw.url + "/v1/chat/completions",
        {"model": provider, "messages": [{"role": "user", "content": text}]},
        timeout=30,
    )
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"]


def test_an_anthropic_provider_sending_only_pings_is_cut_off_for_every_client(gw):
    marker = f"pings {uuid.uuid4().hex}"
    body = {
        "model": "anthropic",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": f"{marker}\n#sim fail=pings_only token_interval_ms=100"}],
    }
    with ThreadPoolExecutor(2) as pool:  # the second is a coalesced follower (or gets the replayed error)
        streams = list(pool.map(lambda _: read_stream(gw, "/v1/messages", body), range(2)))
    for events in streams:
        names = [name for name, _ in events]
        assert names.count("error") == 1 and names[-1] == "error" and "message_stop" not in names, names
        error = events[-1][1]["error"]
        assert error["type"] == "api_error" and "UPSTREAM_MAX_DURATION_S" in error["message"], error
    assert "content_block_delta" in [name for name, _ in streams[0]]  # the tokens before the pings stay delivered
    assert len(calls_for(gw, marker)) == 1  # one upstream call for both clients
    cut_off_and_free_again(gw, marker, "anthropic")


def test_an_openai_provider_streaming_tokens_for_ever_is_cut_off(gw):
    marker = f"forever {uuid.uuid4().hex}"
    body = {
        "model": "simulated",
        "stream": True,
        "messages": [{"role": "user", "content": f"{marker}\n#sim tokens=5000 token_interval_ms=20"}],  # 100 s
    }
    events = read_stream(gw, "/v1/chat/completions", body)
    errors = [data for _, data in events if "error" in data]
    assert len(errors) == 1 and events[-1][1] == errors[0], events[-3:]
    assert errors[0]["error"]["code"] == "upstream_timeout"
    assert "UPSTREAM_MAX_DURATION_S (1.5 s)" in errors[0]["error"]["message"]
    assert any(data.get("choices") and data["choices"][0]["delta"].get("content") for _, data in events)
    (call,) = calls_for(gw, marker)  # never retried after the first byte
    cut_off_and_free_again(gw, marker, "simulated")


def test_a_call_with_no_byte_within_the_bound_is_retried_like_a_stall_then_one_error(gw):
    marker = f"stall {uuid.uuid4().hex}"
    body = {
        "model": "simulated",
        "stream": True,
        "messages": [{"role": "user", "content": f"{marker}\n#sim fail=stall_first"}],
    }
    events = read_stream(gw, "/v1/chat/completions", body)
    assert len(events) == 1, events
    error = events[0][1]["error"]
    assert error["code"] == "upstream_timeout" and "UPSTREAM_MAX_DURATION_S" in error["message"], error
    assert len(calls_for(gw, marker)) == 3  # UPSTREAM_MAX_ATTEMPTS, all within the 15 s retry deadline
    cut_off_and_free_again(gw, marker, "simulated")
