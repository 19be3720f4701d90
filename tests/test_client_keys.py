"""Client API keys on the real gateway (SLUICE_API_KEYS_FILE): authentication on every
client route, per-key models and limits, coalescing scoped per key, per-key metrics,
ownership of requests and threads, and reloading the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.api_keys import hash_key
from tests.support import ROOT, SSEClient, chat_body, data_events, request, running_gateway, stream_chat, wait_until

pytestmark = pytest.mark.integration

ADMIN = "admin-token-for-tests"
BASE = [
    {"id": "team-a", "sha256": hash_key("sk-team-a")},
    {"id": "team-b", "sha256": hash_key("sk-team-b")},
    {"id": "rpm2", "sha256": hash_key("sk-rpm2"), "rpm": 2},
    {"id": "solo", "sha256": hash_key("sk-solo"), "concurrency": 1},
    {"id": "openai-only", "sha256": hash_key("sk-openai-only"), "models": ["openai/*"]},
    {"id": "tpm10", "sha256": hash_key("sk-tpm10"), "tpm": 10},
]


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


A, B = auth("sk-team-a"), auth("sk-team-b")


def write_keys(path: str, *extra: dict) -> None:
    """Replace the file whole (a reader never sees half of it)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"keys": BASE + list(extra)}, f)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys") / "keys.json")
    write_keys(path)
    return path


@pytest.fixture(scope="module")
def gw(sim, keys_path):
    env = {"SIMULATED_BASE_URL": sim, "SLUICE_API_KEYS_FILE": keys_path, "SLUICE_ADMIN_TOKEN": ADMIN}
    with running_gateway(env) as gateway:
        gateway.sim = sim
        yield gateway


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def calls_for(gateway, text: str) -> int:
    status, _, body = request("GET", gateway.sim + "/stats")
    return sum(1 for r in json.loads(body)["requests"] if text in json.dumps(r["body"]))


def error_of(result) -> tuple[int, dict]:
    status, _, body = result
    return status, body["error"]


# --- authentication ------------------------------------------------------------------------


def test_no_key_or_a_wrong_key_is_401_in_openai_shape(gw):
    for headers in ({}, auth("sk-wrong"), {"authorization": "Basic c2stdGVhbS1h"}):
        for path in ("/api/chat", "/v1/chat/completions"):
            status, hdrs, body = request("POST", gw.url + path, chat_body("hi"), headers)
            assert status == 401, (path, headers, body)
            err = json.loads(body)["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert err["param"] is None and err["message"]
            assert hdrs["www-authenticate"].startswith("Bearer")
    for method, path in (
        ("POST", "/api/threads"),
        ("GET", "/api/threads/x/messages"),
        ("POST", "/api/chat/x/cancel"),
        ("GET", "/v1/models"),
    ):
        assert request(method, gw.url + path)[0] == 401, path
    assert "sk-wrong" not in gw.output()


def test_two_different_keys_in_one_request_are_refused(gw):
    """Probed: with two Authorization (or x-api-key) headers the first was used, whatever a
    proxy in front had checked; now a 401 naming the conflict, on every client route."""
    import httpx

    pairs = (
        [("authorization", "Bearer sk-team-a"), ("authorization", "Bearer sk-team-b")],
        [("authorization", "Bearer sk-wrong"), ("authorization", "Bearer sk-team-a")],
        [("x-api-key", "sk-team-a"), ("x-api-key", "sk-team-b")],
    )
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        for headers in pairs:
            for path in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
                response = client.post(path, json=chat_body("hi"), headers=headers)
                assert response.status_code == 401, (path, headers, response.text)
                assert "more than one" in response.text  # in the route's own format
            assert client.get("/v1/models", headers=headers).status_code == 401
        same = [("authorization", "Bearer sk-team-a"), ("authorization", "Bearer sk-team-a")]
        assert client.get("/v1/models", headers=same).status_code == 200


def test_the_openai_sdk_sees_authentication_errors_and_streams_with_a_key(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=20) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "hi"}])
        assert info.value.code == "invalid_api_key"
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-team-a", max_retries=0, timeout=20) as good:
        stream = good.chat.completions.create(
            model="sim-1", messages=[{"role": "user", "content": unique("sdk") + "\n#sim tokens=3"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text


def test_the_right_key_streams_and_x_api_key_is_accepted(gw):
    for headers in (A, {"x-api-key": "sk-team-b"}):
        status, _, events = stream_chat(gw.url + "/api/chat", chat_body(unique("ok") + "\n#sim tokens=3"), headers)
        assert status == 200 and data_events(events)[-1]["type"] == "done"


def test_operator_routes_need_no_client_key(gw):
    for path in ("/healthz", "/readyz", "/metrics", "/api/metrics/performance", "/api/alerts"):
        assert request("GET", gw.url + path)[0] == 200, path


# --- models and limits ---------------------------------------------------------------------


def test_a_model_the_key_may_not_use_is_403(gw):
    key = auth("sk-openai-only")
    status, err = error_of(stream_chat(gw.url + "/api/chat", chat_body("hi"), key))
    assert status == 403 and err["code"] == "model_not_allowed" and "simulated/sim-1" in err["message"]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-openai-only", max_retries=0, timeout=20) as client:
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "hi"}])
        assert client.models.list().data == []  # it sees only what it may use
    status, _, body = request("GET", gw.url + "/v1/models", headers=A)
    assert [m["id"] for m in json.loads(body)["data"]] == ["simulated/sim-1"]


def test_rpm_2_makes_the_third_request_429_with_retry_after(gw):
    key = auth("sk-rpm2")
    for _ in range(2):
        assert stream_chat(gw.url + "/api/chat", chat_body(unique("rpm") + "\n#sim tokens=1"), key)[0] == 200
    status, headers, body = stream_chat(gw.url + "/api/chat", chat_body(unique("rpm")), key)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert stream_chat(gw.url + "/api/chat", chat_body(unique("rpm")), A)[0] == 200  # others unaffected


def test_tokens_are_charged_when_the_stream_ends_and_tpm_then_refuses(gw):
    key = auth("sk-tpm10")
    assert stream_chat(gw.url + "/api/chat", chat_body(unique("tpm") + "\n#sim tokens=20"), key)[0] == 200
    status, headers, body = stream_chat(gw.url + "/api/chat", chat_body(unique("tpm")), key)
    assert status == 429 and "tokens/minute" in body["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 60


def test_concurrency_1_refuses_a_second_open_stream(gw):
    key = auth("sk-solo")
    first = SSEClient(gw.url + "/api/chat", chat_body(unique("long") + "\n#sim tokens=500 token_interval_ms=20"), key)
    try:
        assert first.status == 200
        status, headers, body = stream_chat(gw.url + "/api/chat", chat_body(unique("second")), key)
        assert status == 429 and "concurrent" in body["error"]["message"] and headers["retry-after"]
    finally:
        first.close()
    wait_until(
        lambda: stream_chat(gw.url + "/api/chat", chat_body(unique("after") + "\n#sim tokens=1"), key)[0] == 200,
        timeout=10,
        message="the stream slot to be free once the first client left",
    )


# --- coalescing scope ----------------------------------------------------------------------------


def _same_question_at_once(gateway, text: str, headers: list[dict]):
    body = chat_body(text + "\n#sim ttft_ms=400 tokens=3")
    with ThreadPoolExecutor(max_workers=len(headers)) as pool:
        results = list(pool.map(lambda h: stream_chat(gateway.url + "/api/chat", body, h), headers))
    assert [status for status, _, _ in results] == [200] * len(headers)
    return sorted(data_events(events)[0]["role"] for _, _, events in results)


def test_with_keys_coalescing_is_per_key(gw):
    text = unique("scoped")
    assert _same_question_at_once(gw, text, [A, B]) == ["leader", "leader"]
    assert calls_for(gw, text) == 2
    text = unique("same key")
    assert _same_question_at_once(gw, text, [A, A]) == ["follower", "leader"]
    assert calls_for(gw, text) == 1


def test_coalesce_scope_global_shares_across_keys(sim, keys_path):
    env = {"SIMULATED_BASE_URL": sim, "SLUICE_API_KEYS_FILE": keys_path, "COALESCE_SCOPE": "global"}
    with running_gateway(env) as gateway:
        gateway.sim = sim
        text = unique("global")
        assert _same_question_at_once(gateway, text, [A, B]) == ["follower", "leader"]
        assert calls_for(gateway, text) == 1
        status, _, body = request("GET", gateway.url + "/api/metrics/performance")
        assert json.loads(body)["coalesce"]["scope"] == "global"


# --- metrics -------------------------------------------------------------------------------


def test_per_key_counters_in_metrics(gw):
    key = auth("sk-team-b")
    assert stream_chat(gw.url + "/api/chat", chat_body(unique("m") + "\n#sim tokens=4"), key)[0] == 200
    status, _, raw = request("GET", gw.url + "/metrics")
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("sluice_key_requests_total", (("key_id", "team-b"), ("outcome", "done")))] >= 1
    assert samples[("sluice_key_tokens_total", (("key_id", "team-b"),))] > 0
    assert samples[("sluice_key_open_streams", (("key_id", "team-b"),))] == 0
    assert samples[("sluice_coalesce_scope", (("scope", "key"),))] == 1
    assert samples[("sluice_key_auth_failures_total", (("reason", "missing"),))] >= 0
    assert {k for (name, k) in samples if name == "sluice_requests_total"}  # the Metrics actor's text is kept
    status, _, body = request("GET", gw.url + "/api/metrics/performance")
    coalesce = json.loads(body)["coalesce"]
    assert coalesce["scope"] == "key" and {"leaders", "followers"} <= set(coalesce)


# --- ownership -------------------------------------------------------------------------------


def test_a_key_cancels_only_its_own_requests(gw):
    client = SSEClient(gw.url + "/api/chat", chat_body(unique("own") + "\n#sim tokens=500 token_interval_ms=20"), A)
    try:
        request_id = client.headers["x-request-id"]
        while client.next()[1].get("type") != "delta":
            pass
        status, _, body = request("POST", f"{gw.url}/api/chat/{request_id}/cancel", headers=B)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        assert client.next()[1]["type"] == "delta"  # still streaming
        assert request("POST", f"{gw.url}/api/chat/{request_id}/cancel", headers=A)[0] == 202
        assert data_events(client.read_all())[-1]["code"] == "cancelled"
    finally:
        client.close()


def test_a_thread_belongs_to_the_key_that_created_it(gw):
    status, _, body = request("POST", gw.url + "/api/threads", headers=A)
    assert status == 201
    thread = json.loads(body)["thread_id"]
    url = f"{gw.url}/api/threads/{thread}/messages"
    status, _, events = stream_chat(url, {"content": unique("t") + "\n#sim tokens=2"}, A)
    assert status == 200 and data_events(events)[-1]["type"] == "done"
    assert request("GET", url, headers=A)[0] == 200
    assert request("GET", url, headers=B)[0] == 404
    status, _, body = stream_chat(url, {"content": "mine now"}, B)
    assert status == 404 and body["error"]["code"] == "thread_not_found"
    assert len(json.loads(request("GET", url, headers=A)[2])["messages"]) == 2  # B stored nothing


# --- reloading ----------------------------------------------------------------------------------


def chat_status(gw, key: str) -> int:
    return stream_chat(gw.url + "/api/chat", chat_body(unique("r") + "\n#sim tokens=1"), auth(key))[0]


def test_a_changed_file_is_reread(gw, keys_path):
    new = {"id": "late", "sha256": hash_key("sk-late")}
    try:
        write_keys(keys_path, new)
        wait_until(lambda: chat_status(gw, "sk-late") == 200, timeout=10, message="the new key to be accepted")
    finally:
        write_keys(keys_path)
    wait_until(lambda: chat_status(gw, "sk-late") == 401, timeout=10, message="the removed key to be refused")


def _swap_in_place(path: str, old: str, new: str) -> None:
    """Change one key without changing the file's size, inode or mtime: only an explicit
    reload can notice."""
    st = os.stat(path)
    text = open(path).read().replace(hash_key(old), hash_key(new))
    with open(path, "r+") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size


def admin_reload(gw):
    status, _, body = request("POST", gw.url + "/api/admin/keys/reload", headers=auth(ADMIN))
    return status, json.loads(body)


def test_admin_reload_rereads_the_file_and_refuses_a_bad_one(gw, keys_path):
    try:
        write_keys(keys_path, {"id": "swap", "sha256": hash_key("sk-swap-1")})
        wait_until(lambda: chat_status(gw, "sk-swap-1") == 200, timeout=10, message="sk-swap-1 accepted")
        _swap_in_place(keys_path, "sk-swap-1", "sk-swap-2")
        status, body = admin_reload(gw)
        assert status == 200 and body["keys"]["keys"] == len(BASE) + 1
        assert chat_status(gw, "sk-swap-2") == 200 and chat_status(gw, "sk-swap-1") == 401

        with open(keys_path, "w") as f:
            f.write('{"keys": [{"id": "broken"}]}')
        status, body = admin_reload(gw)
        assert status == 422 and body["error"]["code"] == "invalid_keys_file" and "keys[0]" in body["error"]["message"]
        assert chat_status(gw, "sk-swap-2") == 200  # the previous keys stay in force
    finally:
        write_keys(keys_path)


def cli(gw, keys_path: str, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "admin", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "SLUICE_ACTOR_PORT": str(gw.actor_port),
            "PYTHONPATH": str(ROOT),
            "SLUICE_API_KEYS_FILE": keys_path,
            "SLUICE_ADMIN_TOKEN": ADMIN,
            "SLUICE_DB": gw.db,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_reload_keys_reaches_the_edge(gw, keys_path):
    try:
        write_keys(keys_path, {"id": "swap", "sha256": hash_key("sk-cli-1")})
        wait_until(lambda: chat_status(gw, "sk-cli-1") == 200, timeout=10, message="sk-cli-1 accepted")
        _swap_in_place(keys_path, "sk-cli-1", "sk-cli-2")
        done = cli(gw, keys_path, "reload-keys")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: chat_status(gw, "sk-cli-2") == 200, timeout=10, message="the edge to reload")
        with open(keys_path, "w") as f:
            f.write("not json")
        done = cli(gw, keys_path, "reload-keys")
        assert done.returncode == 2 and "not JSON" in done.stderr
    finally:
        write_keys(keys_path)


def test_a_bad_keys_file_stops_the_start_with_exit_2(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"id": "x", "sha256": "nope"}]}')
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SLUICE_API_KEYS_FILE": str(path)},
    )
    assert done.returncode == 2
    assert "SLUICE_API_KEYS_FILE" in done.stderr and "keys[0] ('x')" in done.stderr and "sha256" in done.stderr


def test_open_access_is_announced_at_start(gateway):
    from pathlib import Path

    assert "no SLUICE_API_KEYS_FILE: every client is allowed" in Path(gateway.log_path).read_text()
    assert request("POST", gateway.url + "/api/chat", chat_body(unique("open") + "\n#sim tokens=1"))[0] == 200
