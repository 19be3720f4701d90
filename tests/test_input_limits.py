"""Bad bodies against the real gateway: every one answered with a clear 4xx JSON error,
never a 500, a hang or a dead flight (issue 10, "Safe to expose")."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from edge.models import MAX_MODEL_CHARS
from edge.streams import LocalStreams, Rejection
from protocols import messages as m
from tests.support import chat_body, data_events, request, stream_chat

pytestmark = pytest.mark.integration


def unique(text: str = "limits") -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def post_raw(url: str, raw: bytes, timeout: float = 15.0):
    status, _, body = request("POST", url, raw, {"content-type": "application/json"}, timeout=timeout)
    return status, json.loads(body)


def test_integer_beyond_64_bits_is_a_422_naming_the_field_and_leaves_no_dead_flight(gateway):
    body = chat_body(unique() + "\n#sim tokens=2", seed=2**70)
    for _ in range(2):  # the second identical request must not join a dead flight
        status, err = post_raw(gateway.url + "/api/chat", json.dumps(body).encode())
        assert status == 422, err
        assert err["error"]["code"] == "integer_out_of_range" and "seed" in err["error"]["message"]
    ok_body = chat_body(unique() + "\n#sim tokens=2", seed=2**63 - 1)
    status, _, events = stream_chat(gateway.url + "/api/chat", ok_body)
    assert status == 200 and data_events(events)[-1]["type"] == "done"


# --- the layer behind validation: an unencodable message never strands a flight ----------


class EncodingBridge:
    """Stands in for ActorBridge: encodes as it does (edge.bridge._encoded), then fails
    or answers as the test says."""

    def __init__(self, failure: Exception | None = None):
        self.failure, self.asked, self.told = failure, [], []

    async def ask(self, to, msg, timeout=5.0):
        from edge.bridge import _encoded

        self.asked.append(msg)
        _encoded(msg)
        if self.failure is not None:
            raise self.failure
        return m.Admitted(msg.request_id, "s-1", "leader")

    async def tell(self, to, msg):
        self.told.append(msg)


class NoHub:
    async def subscribe(self, stream_id, on_events):
        pass

    def unsubscribe(self, stream_id, on_events):
        pass


async def _both_refused(bridge, body: dict):
    streams = LocalStreams(bridge, NoHub(), "edge-1", 2)
    key = "ab" * 32
    joins = [asyncio.create_task(streams.join(rid, "simulated", "m", body, key, 0.0)) for rid in ("a", "b")]
    results = await asyncio.wait_for(asyncio.gather(*joins, return_exceptions=True), 5)
    await asyncio.wait_for(asyncio.gather(*list(streams._tasks)), 5)
    assert streams.by_key == {} and streams.by_request == {} and not streams._tasks
    return results


def test_an_unencodable_submit_is_a_422_for_every_waiting_client():
    results = asyncio.run(_both_refused(EncodingBridge(), {"messages": [], "seed": 2**70}))
    assert all(isinstance(r, Rejection) and r.status == 422 and r.code == "invalid_request" for r in results)
    assert "cannot be encoded" in results[0].message


def test_any_failure_while_submitting_is_a_500_for_every_waiting_client():
    results = asyncio.run(_both_refused(EncodingBridge(RuntimeError("boom")), {"messages": []}))
    assert all(isinstance(r, Rejection) and r.status == 500 and r.code == "internal_error" for r in results)


def test_the_bridge_turns_an_encoding_failure_into_a_bridge_error():
    from edge.bridge import BridgeError, _encoded

    for body in ({"seed": 2**70}, {"x": "\ud800"}):
        with pytest.raises(BridgeError) as info:
            _encoded(m.Submit("r", "", "simulated", "m", body, "edge-1", 0.0))
        assert info.value.code == "unencodable"


BAD_BODIES = [
    # (raw body, status, code, where the message must point)
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
        422,
        "integer_out_of_range",
        "seed",
    ),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 422, "invalid_string", "messages[0].content"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "response_format": ' + b"[" * 100 + b"]" * 100 + b"}",
        400,
        "nesting_too_deep",
        "response_format",
    ),
    (b"[" * 100_000, 400, "nesting_too_deep", "64"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 422, "non_finite_number", "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', 422, "non_finite_number", "top_p"),
    (
        b'{"messages": [{"role": "user", "content": "hi", "extra": {"n": -9223372036854775809}}]}',
        422,
        "integer_out_of_range",
        "messages[0].extra.n",
    ),
]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/threads/{thread}/messages"])
def test_bad_bodies_get_a_clear_error_on_every_route(gateway, path):
    if "{thread}" in path:
        status, _, created = request("POST", gateway.url + "/api/threads")
        path = path.format(thread=json.loads(created)["thread_id"])
    for raw, status, code, where in BAD_BODIES:
        if path.startswith("/api/threads"):
            raw = raw.replace(b'"messages": [{"role": "user", "content": "hi"}], ', b'"content": "hi", ')
        got, err = post_raw(gateway.url + path, raw)
        assert (got, err["error"]["code"]) == (status, code), (raw[:80], err)
        assert where in err["error"]["message"], err


def test_nul_characters_in_content_are_carried_not_refused(gateway):
    status, _, events = stream_chat(gateway.url + "/api/chat", chat_body(unique("nul\x00inside") + "\n#sim tokens=2"))
    assert status == 200 and data_events(events)[-1]["type"] == "done"


@pytest.mark.parametrize(
    "path, body, refused",
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, 422),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 422),
        ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, 400),  # Anthropic's
        ("/v1/responses", {"input": "hi"}, 422),
        ("/v1/embeddings", {"input": "hi"}, 422),
    ],
)
def test_a_model_name_longer_than_any_model_is_refused_not_made_a_metrics_label(gateway, path, body, refused):
    # On main five requests naming 200 KB models made /metrics 104 MB (every series of every
    # histogram repeats the label), served in 4.5 s; 50 such names per provider are kept.
    long = "simulated/" + "m" * (MAX_MODEL_CHARS + 1)
    status, _, raw = request("POST", gateway.url + path, {**body, "model": long})
    assert status == refused, raw[:300]
    assert f"at most {MAX_MODEL_CHARS} characters" in raw.decode()
    status, _, raw = request("POST", gateway.url + path, {**body, "model": "simulated/" + "m" * MAX_MODEL_CHARS})
    assert status == 200, raw[:300]  # the longest allowed is served
