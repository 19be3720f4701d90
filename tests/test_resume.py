"""Resumable streams over plain HTTP (issue 15), against the real gateway and the simulated
provider: a resumable stream dropped mid-answer and resumed with `Last-Event-ID` gets every
remaining event exactly once from the one upstream call; without opt-in a drop cancels at
once; a parked stream nobody resumes is cancelled after SLUICE_RESUME_GRACE_S; only the
key that owns a request may resume it; a stream that finished while parked gives its tail."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid

import pytest

from tests.support import EventStream as Stream
from tests.support import chat_body, get_json, request, running_gateway, wait_until

pytestmark = pytest.mark.integration

GRACE_S = 4.0
KEYS = {"a": "sk-resume-a-0123456789", "b": "sk-resume-b-0123456789", "m": "sk-resume-m-0123456789"}


@pytest.fixture(scope="module")
def gw(sim, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("resume") / "keys.json"
    entries = [{"id": k, "sha256": hashlib.sha256(secret.encode()).hexdigest()} for k, secret in KEYS.items()]
    keys_file.write_text(json.dumps({"keys": entries}))
    env = {"SIMULATED_BASE_URL": sim, "SLUICE_API_KEYS_FILE": str(keys_file), "SLUICE_RESUME_GRACE_S": str(GRACE_S)}
    with running_gateway(env) as gw:
        gw.sim = sim
        yield gw


def auth(key: str = "a", **extra) -> dict:
    return {"authorization": f"Bearer {KEYS[key]}", **extra}


def prompt(label: str, tokens: int, interval_ms: int) -> tuple[str, dict]:
    text = f"{label} {uuid.uuid4().hex[:12]}"
    return text, chat_body(f"{text}\n#sim tokens={tokens} token_interval_ms={interval_ms}")


def calls_for(gw, text: str) -> list[dict]:
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if text in json.dumps(r["body"])]


def cancellations_for(gw, text: str) -> list[dict]:
    ids = {r["call_id"] for r in calls_for(gw, text)}
    return [c for c in get_json(gw.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]


def resume(gw, request_id: str, last_id: int | None, key: str = "a") -> Stream:
    """GET the events after `last_id`; retried while the gateway has not yet seen the first
    connection go (409)."""
    headers = auth(key) if last_id is None else auth(key, **{"last-event-id": str(last_id)})
    url = f"{gw.url}/api/chat/{request_id}/events"
    box: dict = {}

    def attempt() -> bool:
        stream = Stream("GET", url, headers=headers)
        if stream.status == 409:
            stream.json()
            stream.close()
            return False
        box["stream"] = stream
        return True

    wait_until(attempt, timeout=GRACE_S, message="the dropped connection was seen")
    return box["stream"]


def start_and_drop(gw, body: dict, after: int, headers: dict | None = None) -> tuple[str, list]:
    stream = Stream("POST", gw.url + "/api/chat", body, headers or auth())
    assert stream.status == 200
    seen = stream.take(after)
    stream.close()
    return stream.headers["x-request-id"], seen


def deltas_text(events) -> str:
    return "".join(data["delta"] for _, data in events if data["type"] == "delta")


@pytest.mark.parametrize("opt_in", ["body", "header"])
def test_a_dropped_resumable_stream_resumes_with_every_remaining_event_once_on_one_upstream_call(gw, opt_in):
    text, body = prompt("resume", 30, 40)
    headers = auth()
    if opt_in == "body":
        body["resumable"] = True
    else:
        headers["x-sluice-resumable"] = "1"
    request_id, first = start_and_drop(gw, body, 5, headers)
    assert [i for i, _ in first] == [0, 1, 2, 3, 4] and first[0][1]["type"] == "meta"
    stream = resume(gw, request_id, 4)
    assert stream.status == 200 and stream.headers["x-request-id"] == request_id
    rest = stream.rest()
    stream.close()
    events = first + rest
    assert [i for i, _ in events] == list(range(len(events)))  # every id once, in order
    assert rest[-1][1]["type"] == "done" and [d["type"] for _, d in events].count("done") == 1
    assert len(deltas_text(events).split()) == 30  # every token once
    assert len(calls_for(gw, text)) == 1 and cancellations_for(gw, text) == []


def test_a_resumed_request_is_one_request_in_the_records(gw):
    text, body = prompt("records", 12, 40)
    request_id, first = start_and_drop(gw, {**body, "resumable": True}, 3, auth("m"))
    stream = resume(gw, request_id, first[-1][0], key="m")
    assert stream.rest()[-1][1]["type"] == "done"
    stream.close()

    def requests_of_m(outcome: str = "") -> int:
        text = request("GET", gw.url + "/metrics")[2].decode()
        pattern = r'^sluice_requests_total\{([^}]*key_id="m"[^}]*)\} (\S+)'
        return sum(int(float(v)) for labels, v in re.findall(pattern, text, re.M) if f'outcome="{outcome}' in labels)

    wait_until(lambda: requests_of_m() >= 1, timeout=10, message="the request's record")
    assert requests_of_m() == 1 and requests_of_m("done") == 1


def test_without_opt_in_a_drop_cancels_the_upstream_call_at_once_and_cannot_be_resumed(gw):
    text, body = prompt("plain", 500, 20)
    request_id, first = start_and_drop(gw, body, 5)
    assert [i for i, _ in first] == [0, 1, 2, 3, 4]  # ids on every stream, resumable or not
    wait_until(lambda: cancellations_for(gw, text), timeout=GRACE_S, message="the provider saw the cancel")
    status, _, error = request("GET", f"{gw.url}/api/chat/{request_id}/events", headers=auth(**{"last-event-id": "4"}))
    assert status == 404 and json.loads(error)["error"]["code"] == "not_found"


def test_a_parked_stream_nobody_resumes_is_cancelled_after_the_grace(gw):
    text, body = prompt("grace", 1000, 20)
    dropped_at = time.time()
    request_id, _ = start_and_drop(gw, {**body, "resumable": True}, 5)
    cancelled = wait_until(
        lambda: cancellations_for(gw, text), timeout=GRACE_S + 15, message="the cancel after the grace"
    )
    assert cancelled[0]["observed_at"] - dropped_at >= GRACE_S - 0.5  # kept going meanwhile
    status, _, error = request("GET", f"{gw.url}/api/chat/{request_id}/events", headers=auth(**{"last-event-id": "4"}))
    assert status == 404 and "SLUICE_RESUME_GRACE_S" in json.loads(error)["error"]["message"]


def test_only_the_key_that_owns_a_request_may_resume_it(gw):
    text, body = prompt("owner", 40, 40)
    request_id, first = start_and_drop(gw, {**body, "resumable": True}, 5)
    status, _, error = request(
        "GET", f"{gw.url}/api/chat/{request_id}/events", headers=auth("b", **{"last-event-id": "4"})
    )
    assert status == 404 and json.loads(error)["error"]["code"] == "not_found"
    stream = resume(gw, request_id, 4)  # still parked: the owner gets the rest
    rest = stream.rest()
    stream.close()
    assert [i for i, _ in rest] == list(range(5, 5 + len(rest))) and rest[-1][1]["type"] == "done"
    assert len(calls_for(gw, text)) == 1


def test_a_head_says_a_stream_can_be_resumed_without_taking_it(gw):
    """Probed: HEAD (which Starlette adds to every GET route) resumed the parked stream into
    a response with no body, so the owner's GET that followed found nothing: 404."""
    text, body = prompt("head", 40, 40)
    request_id, first = start_and_drop(gw, {**body, "resumable": True}, 5)
    url = f"{gw.url}/api/chat/{request_id}/events"
    heads: list = []

    def head_ok() -> bool:
        heads.append(request("HEAD", url, headers=auth(**{"last-event-id": "4"})))
        return heads[-1][0] != 409  # the dropped connection not seen yet

    wait_until(head_ok, timeout=GRACE_S, message="the dropped connection was seen")
    status, headers, content = heads[-1]
    assert status == 200 and headers["content-type"].startswith("text/event-stream") and content == b""
    assert request("HEAD", url, headers=auth("b"))[0] == 404  # another key's: as unknown
    assert request("HEAD", url, headers=auth(**{"last-event-id": "999"}))[0] == 422
    stream = resume(gw, request_id, 4)  # still parked: the GET gets the rest
    rest = stream.rest()
    stream.close()
    assert [i for i, _ in rest] == list(range(5, 5 + len(rest))) and rest[-1][1]["type"] == "done"
    assert len(calls_for(gw, text)) == 1


def test_a_stream_that_finished_while_parked_gives_its_tail(gw):
    text, body = prompt("finished", 8, 30)
    request_id, first = start_and_drop(gw, {**body, "resumable": True}, 3)
    wait_until(lambda: calls_for(gw, text)[0]["outcome"] == "completed", timeout=GRACE_S, message="the call finished")
    stream = resume(gw, request_id, 2)
    rest = stream.rest()
    stream.close()
    assert [i for i, _ in rest] == list(range(3, 3 + len(rest)))
    assert len(deltas_text(first + rest).split()) == 8 and rest[-1][1]["type"] == "done"


def test_a_resume_while_the_first_connection_streams_or_with_a_bad_id_is_refused(gw):
    text, body = prompt("attached", 200, 20)
    stream = Stream("POST", gw.url + "/api/chat", {**body, "resumable": True}, auth())
    try:
        stream.take(2)
        url = f"{gw.url}/api/chat/{stream.headers['x-request-id']}/events"
        status, headers, error = request("GET", url, headers=auth(**{"last-event-id": "1"}))
        assert status == 409 and json.loads(error)["error"]["code"] == "still_streaming"
        status, _, error = request("GET", url, headers=auth(**{"last-event-id": "one"}))
        assert status == 422 and json.loads(error)["error"]["code"] == "invalid_request"
        status, _, _ = request("GET", f"{gw.url}/api/chat/{uuid.uuid4().hex}/events", headers=auth())
        assert status == 404
        status, _, error = request("POST", gw.url + "/api/chat", {**body, "resumable": "yes"}, auth())
        assert status == 422 and "resumable" in json.loads(error)["error"]["message"]
    finally:
        stream.close()
