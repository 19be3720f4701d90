"""The running gateway end to end: real actor system, real uvicorn, real simulated
provider over HTTP/2, real HTTP from the client."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.support import SSEClient, chat_body, data_events, get_json, request, stream_chat, wait_until

pytestmark = pytest.mark.integration


def unique(text: str = "hello") -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def sim_stats(gateway) -> dict:
    return get_json(gateway.sim + "/stats")[1]


def test_stream_has_ping_meta_deltas_and_one_terminal_event(gateway):
    status, headers, events = stream_chat(gateway.url + "/api/chat", chat_body(unique() + "\n#sim tokens=5"))
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert len(headers["x-request-id"]) == 32
    assert events[0][0] == "ping"
    data = data_events(events)
    assert data[0]["type"] == "meta"
    assert data[0]["request_id"] == headers["x-request-id"]
    assert data[0]["ttft_ms"] > 0 and data[0]["role"] == "leader"
    deltas = [d["delta"] for d in data if d["type"] == "delta"]
    assert len(deltas) == 5 and all(deltas)
    terminal = [d for d in data if d["type"] in ("done", "error")]
    assert terminal == [data[-1]] and data[-1]["type"] == "done" and data[-1]["finish_reason"] == "stop"


def test_the_upstream_call_went_over_http2(gateway):
    text = unique()
    stream_chat(gateway.url + "/api/chat", chat_body(text + "\n#sim tokens=2"))
    calls = [r for r in sim_stats(gateway)["requests"] if text in json.dumps(r["body"])]
    assert len(calls) == 1 and calls[0]["protocol"] == "h2"


def test_same_request_twice_in_a_row_gives_the_same_answer(gateway):
    body = chat_body(unique() + "\n#sim tokens=4")
    first = [d for d in data_events(stream_chat(gateway.url + "/api/chat", body)[2]) if d["type"] == "delta"]
    second = [d for d in data_events(stream_chat(gateway.url + "/api/chat", body)[2]) if d["type"] == "delta"]
    assert first == second and len(first) == 4


def test_upstream_500_is_an_in_band_error_event(gateway):
    status, _, events = stream_chat(gateway.url + "/api/chat", chat_body(unique() + "\n#sim fail=500"))
    assert status == 200 and events[0][0] == "ping"
    data = data_events(events)
    assert data[-1]["type"] == "error" and data[-1]["code"] == "upstream_5xx"
    assert sum(1 for d in data if d["type"] in ("done", "error")) == 1


def test_reset_mid_stream_gives_deltas_then_an_error(gateway):
    body = chat_body(unique() + "\n#sim fail=reset_mid fail_after_tokens=2 tokens=6")
    _, _, events = stream_chat(gateway.url + "/api/chat", body)
    data = data_events(events)
    assert [d["type"] for d in data].count("delta") == 2
    assert data[-1]["type"] == "error" and data[-1]["code"] == "upstream_reset"


def test_upstream_429_is_reported_with_its_code(gateway):
    _, _, events = stream_chat(gateway.url + "/api/chat", chat_body(unique() + "\n#sim fail=429 retry_after_s=0.01"))
    assert data_events(events)[-1]["code"] == "upstream_429"


def test_client_disconnect_cancels_the_upstream_call(gateway):
    text = unique("disconnect")
    client = SSEClient(gateway.url + "/api/chat", chat_body(text + "\n#sim tokens=500 token_interval_ms=20"))
    try:
        while True:
            name, data = client.next()
            if name == "message" and data["type"] == "delta":
                break
    finally:
        client.close()
    closed_at = time.time()

    def cancelled():
        stats = sim_stats(gateway)
        ids = {r["call_id"] for r in stats["requests"] if text in json.dumps(r["body"])}
        return [c for c in stats["cancellations"] if c["call_id"] in ids]

    observed = wait_until(cancelled, timeout=5, message="the simulated provider to observe the cancel")
    assert observed[0]["tokens_sent"] < 500
    assert observed[0]["observed_at"] >= closed_at - 1.0


def test_explicit_cancel_ends_the_stream_and_the_upstream_call(gateway):
    text = unique("cancel")
    client = SSEClient(gateway.url + "/api/chat", chat_body(text + "\n#sim tokens=500 token_interval_ms=20"))
    try:
        request_id = client.headers["x-request-id"]
        while client.next()[1].get("type") != "delta":
            pass  # the upstream call is under way
        status, _, body = request("POST", f"{gateway.url}/api/chat/{request_id}/cancel")
        assert status == 202 and json.loads(body) == {"request_id": request_id, "cancelled": True}
        data = data_events(client.read_all())
        assert data[-1] == {"type": "error", "code": "cancelled", "message": "cancelled by the client"}
    finally:
        client.close()

    def cancelled():
        stats = sim_stats(gateway)
        ids = {r["call_id"] for r in stats["requests"] if text in json.dumps(r["body"])}
        return [c for c in stats["cancellations"] if c["call_id"] in ids]

    wait_until(cancelled, timeout=5, message="the upstream call to be cancelled")
    status, _, body = request("POST", f"{gateway.url}/api/chat/{request_id}/cancel")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def _error(status_body):
    status, _, body = status_body
    return status, json.loads(body)["error"]


def test_a_405_names_every_method_the_path_takes(gateway):
    """Probed: a 405 carried no Allow header (RFC 9110 requires one), and for a path served
    by two routes (GET and POST /api/threads/{id}/messages) Starlette's names one route's."""
    for method, path, allowed in (
        ("GET", "/v1/chat/completions", {"POST"}),
        ("DELETE", "/v1/messages", {"POST"}),
        ("PUT", "/v1/models", {"GET", "HEAD"}),
        ("PUT", "/api/threads/t1/messages", {"GET", "HEAD", "POST"}),
        ("DELETE", "/api/chat/r1/events", {"GET", "HEAD"}),
    ):
        status, headers, body = request(method, gateway.url + path)
        assert status == 405 and body, (method, path)
        assert {m.strip() for m in headers["allow"].split(",")} == allowed, (path, headers.get("allow"))


def test_a_compressed_body_is_a_415_not_malformed_json(gateway):
    """Probed: `Content-Encoding: gzip` was ignored, so a gzipped body was a 400
    malformed_json (misleading) and a plain one with the header was served as if unsent."""
    import gzip

    body = json.dumps(chat_body("hi")).encode()
    for path in ("/api/chat", "/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/responses"):
        for payload in (gzip.compress(body), body):
            headers = {"content-type": "application/json", "content-encoding": "gzip"}
            status, _, raw = request("POST", gateway.url + path, payload, headers)
            assert status == 415 and "content-encoding" in raw.decode(), (path, status, raw[:200])
    headers = {"content-type": "application/json", "content-encoding": "identity"}
    assert request("POST", gateway.url + "/v1/chat/completions", body, headers)[0] == 200


def test_bad_input_gets_clear_json_errors(gateway):
    url = gateway.url + "/api/chat"
    json_ct = {"content-type": "application/json"}
    status, err = _error(request("POST", url, b"{not json", json_ct))
    assert status == 400 and err["code"] == "malformed_json"
    status, err = _error(request("POST", url, {"messages": []}))
    assert status == 422 and "messages" in err["message"]
    status, err = _error(request("POST", url, {"nope": 1}))
    assert status == 422 and "messages" in err["message"]
    status, err = _error(request("POST", url, {"messages": [{"role": "user", "content": 5}]}))
    assert status == 422 and "messages[0].content" in err["message"]
    status, err = _error(request("POST", url, {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}))
    assert status == 422 and "temperature" in err["message"]
    status, err = _error(request("POST", url, b"x" * (1024 * 1024 + 10), json_ct))
    assert status == 413 and err["code"] == "body_too_large"
    status, err = _error(request("POST", url, b"messages=hi", {"content-type": "application/x-www-form-urlencoded"}))
    assert status == 415 and err["code"] == "unsupported_media_type"
    status, err = _error(request("GET", gateway.url + "/no/such/route"))
    assert status == 404 and err["code"] == "not_found"
    status, err = _error(request("GET", url))
    assert status == 405
    status, err = _error(
        request("POST", url, {"messages": [{"role": "user", "content": "x"}], "provider": "anthropic"})
    )
    assert status == 400 and "ANTHROPIC_API_KEY" in err["message"]
    # ...and none of it hurt: the gateway still streams and every actor still answers.
    assert stream_chat(url, chat_body(unique() + "\n#sim tokens=1"))[0] == 200
    assert request("GET", gateway.url + "/readyz")[0] == 200


def test_health_and_readiness(gateway):
    assert get_json(gateway.url + "/healthz") == (200, {"ok": True})
    status, ready = get_json(gateway.url + "/readyz")
    assert status == 200 and ready["ready"] is True
    assert {"metrics", "pool", "coalescer:0", "pacer:simulated"} <= set(ready["actors"])
