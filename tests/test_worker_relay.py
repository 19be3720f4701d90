"""Cancel and resume from any edge worker (SLUICE_WORKERS=2, edge/worker_relay.py): a
cancel or a resume that lands on the worker that does not hold the request is relayed to
the one that does, with the caller's key checked as before.

The kernel picks the worker of each connection (one accept queue), so `other_worker`
opens fresh connections, a bounded number within a deadline, until one lands on the
worker that does not hold the request, and the test sends its request on that kept-alive
connection (each answer's `X-Sluice-Worker` is checked: it must be the other worker).
Real processes throughout: run.py with two workers, the actors, the simulated provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import uuid

import httpcore
import pytest

from edge.worker_relay import Relay, WorkerRelay, new_request_id, owner_of
from tests.support import EventStream as Stream
from tests.support import chat_body, get_json, running_gateway, wait_until, worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GRACE_S = 6.0
KEYS = {"a": "sk-relay-a-0123456789", "b": "sk-relay-b-0123456789"}
TIMEOUT = {"connect": 20.0, "read": 20.0, "write": 20.0, "pool": 20.0}


@pytest.fixture(scope="module")
def gw(sim, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("relay") / "keys.json"
    entries = [{"id": k, "sha256": hashlib.sha256(secret.encode()).hexdigest()} for k, secret in KEYS.items()]
    keys_file.write_text(json.dumps({"keys": entries}))
    env = {
        "SLUICE_WORKERS": "2",
        "SIMULATED_BASE_URL": sim,
        "SIMULATED_RPS": "50",
        "SIMULATED_BURST": "50",
        "SIMULATED_CONCURRENCY": "8",
        "SLUICE_API_KEYS_FILE": str(keys_file),
        "SLUICE_RESUME_GRACE_S": str(GRACE_S),
    }
    with running_gateway(env) as gw:
        gw.sim = sim
        yield gw


def auth(key: str = "a", **extra) -> dict:
    return {"authorization": f"Bearer {KEYS[key]}", **extra}


class Connection:
    """One kept-alive HTTP connection to the gateway, on whichever worker accepted it."""

    def __init__(self, url: str):
        self.url = url
        self.pool = httpcore.ConnectionPool(max_connections=1)
        self.worker = self.request("GET", "/healthz")[1]["x-sluice-worker"]

    def request(self, method: str, path: str, headers: dict | None = None, body: dict | None = None):
        hdrs = dict(headers or {})
        content = None
        if body is not None:
            content, hdrs["content-type"] = json.dumps(body).encode(), "application/json"
        r = self.pool.request(
            method, self.url + path, headers=list(hdrs.items()), content=content, extensions={"timeout": TIMEOUT}
        )
        return r.status, {k.decode().lower(): v.decode() for k, v in r.headers}, r.content

    def stream(self, method: str, path: str, headers: dict | None = None, body: dict | None = None) -> Stream:
        return Stream(method, self.url + path, body, headers, pool=self.pool)

    def close(self) -> None:
        self.pool.close()


def start(gw, body: dict, headers: dict | None = None) -> tuple[Connection, Stream]:
    connection = Connection(gw.url)
    stream = connection.stream("POST", "/api/chat", headers or auth(), body)
    assert stream.status == 200
    assert stream.headers["x-sluice-worker"] == connection.worker
    return connection, stream


def other_worker(gw, owner: str, tries: int = 60) -> Connection:
    """A kept-alive connection on a worker other than `owner` (fresh connections, at most
    `tries`, within a deadline, until the kernel gives one to another worker)."""
    found: dict = {}

    def landed() -> bool:
        if len(found.setdefault("tried", [])) >= tries:
            raise AssertionError(f"no connection landed off worker {owner} in {tries} tries")
        connection = Connection(gw.url)
        found["tried"].append(connection.worker)
        if connection.worker != owner:
            found["connection"] = connection
            return True
        connection.close()
        return False

    wait_until(landed, timeout=30, interval=0.01, message=f"a connection off worker {owner}")
    return found["connection"]


def prompt(label: str, tokens: int, interval_ms: int) -> tuple[str, dict]:
    text = f"{label} {uuid.uuid4().hex[:12]}"
    return text, chat_body(f"{text}\n#sim tokens={tokens} token_interval_ms={interval_ms}")


def calls_for(gw, text: str) -> list[dict]:
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if text in json.dumps(r["body"])]


def cancellations_for(gw, text: str) -> list[dict]:
    ids = {r["call_id"] for r in calls_for(gw, text)}
    return [c for c in get_json(gw.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]


def until_delta(stream: Stream) -> None:
    while stream.next()[1]["type"] != "delta":
        pass


def test_request_ids_name_their_worker():
    request_id = new_request_id(2)
    assert request_id.startswith("w2-") and len(request_id) == 35 and owner_of(request_id) == 2
    assert owner_of(uuid.uuid4().hex) is None  # a one-worker id
    assert owner_of("w0-" + "0" * 32) is None and owner_of("w2-" + "0" * 31) is None
    assert owner_of("w2-" + "G" * 32) is None


def test_only_another_existing_workers_id_is_relayed_and_never_twice():
    relay, stopping = WorkerRelay(1, 2, "/nonexistent", 15.0), asyncio.Event()
    plain = {"headers": [(b"authorization", b"Bearer x")]}
    assert isinstance(relay.route(plain, new_request_id(2), stopping), Relay)
    assert relay.route(plain, new_request_id(1), stopping) is None  # this worker's: answered here
    assert relay.route(plain, new_request_id(3), stopping) is None  # no such worker: 404 here
    assert relay.route(plain, uuid.uuid4().hex, stopping) is None
    relayed = {"headers": [(b"x-sluice-relayed", b"2")]}
    assert relay.route(relayed, new_request_id(2), stopping) is None


def test_a_cancel_on_the_other_worker_ends_the_stream_and_aborts_the_upstream_call(gw):
    text, body = prompt("relay cancel", 500, 20)
    owner_connection, stream = start(gw, body)
    other = None
    try:
        request_id, owner = stream.headers["x-request-id"], stream.headers["x-sluice-worker"]
        assert owner_of(request_id) == int(owner)
        until_delta(stream)  # the upstream call is under way
        other = other_worker(gw, owner)
        status, headers, answer = other.request("POST", f"/api/chat/{request_id}/cancel", auth())
        assert headers["x-sluice-worker"] == other.worker != owner
        assert headers["x-sluice-relayed-to"] == owner
        assert status == 202 and json.loads(answer) == {"request_id": request_id, "cancelled": True}
        rest = stream.rest()
        assert rest[-1][1] == {"type": "error", "code": "cancelled", "message": "cancelled by the client"}
        wait_until(lambda: cancellations_for(gw, text), timeout=10, message="the provider saw the abort")
        assert len(calls_for(gw, text)) == 1
        # over: a second cancel, from either worker, finds nothing
        status, headers, answer = other.request("POST", f"/api/chat/{request_id}/cancel", auth())
        assert headers["x-sluice-worker"] == other.worker
        assert status == 404 and json.loads(answer)["error"]["code"] == "not_found"
    finally:
        stream.close()
        owner_connection.close()
        if other is not None:
            other.close()


def resume_on(connection: Connection, request_id: str, last_id: int) -> Stream:
    """GET the events after `last_id` on `connection`; asked again while the owner has not
    yet seen the previous connection go (409)."""
    box: dict = {}

    def resumed() -> bool:
        stream = connection.stream("GET", f"/api/chat/{request_id}/events", auth(**{"last-event-id": str(last_id)}))
        assert stream.headers["x-sluice-worker"] == connection.worker
        if stream.status == 409:
            assert stream.json()["error"]["code"] == "still_streaming"
            stream.close()
            return False
        box["stream"] = stream
        return True

    wait_until(resumed, timeout=GRACE_S, message="the owner saw the previous connection go")
    return box["stream"]


def test_a_resume_on_the_other_worker_replays_from_last_event_id_to_the_end(gw):
    text, body = prompt("relay resume", 60, 40)
    owner_connection, stream = start(gw, {**body, "resumable": True})
    request_id, owner = stream.headers["x-request-id"], stream.headers["x-sluice-worker"]
    first = stream.take(5)
    stream.close()  # the client is gone: the owner parks the stream
    owner_connection.close()
    assert [i for i, _ in first] == [0, 1, 2, 3, 4]
    other = other_worker(gw, owner)
    try:
        resumed = resume_on(other, request_id, 4)
        assert resumed.status == 200 and resumed.headers["x-request-id"] == request_id
        assert resumed.headers["x-sluice-relayed-to"] == owner
        second = resumed.take(5)
        resumed.close()  # dropped again, on the relaying worker: the owner parks it again
    finally:
        other.close()
    assert [i for i, _ in second] == [5, 6, 7, 8, 9]
    other = other_worker(gw, owner)
    try:
        resumed = resume_on(other, request_id, 9)
        assert resumed.status == 200 and resumed.headers["x-sluice-relayed-to"] == owner
        rest = resumed.rest()
        resumed.close()
    finally:
        other.close()
    events = first + second + rest
    assert [i for i, _ in events] == list(range(len(events)))  # every id once, in order
    assert rest[-1][1]["type"] == "done" and [d["type"] for _, d in events].count("done") == 1
    text_out = "".join(d["delta"] for _, d in events if d["type"] == "delta")
    assert len(text_out.split()) == 60  # every token once
    assert len(calls_for(gw, text)) == 1 and cancellations_for(gw, text) == []


def test_another_key_no_key_or_an_unknown_id_are_refused_on_the_other_worker_as_on_the_owner(gw):
    text, body = prompt("relay owner", 500, 20)
    owner_connection, stream = start(gw, {**body, "resumable": True})
    other = None
    try:
        request_id, owner = stream.headers["x-request-id"], stream.headers["x-sluice-worker"]
        until_delta(stream)
        other = other_worker(gw, owner)
        cancel, events = f"/api/chat/{request_id}/cancel", f"/api/chat/{request_id}/events"
        unknown = f"w{owner}-{uuid.uuid4().hex}"  # names the owner, which knows nothing of it
        answers = {  # what -> (expected status, the answer)
            "cancel, key b": (404, other.request("POST", cancel, auth("b"))),
            "resume, key b": (404, other.request("GET", events, auth("b", **{"last-event-id": "1"}))),
            "cancel, no key": (401, other.request("POST", cancel)),
            "cancel, a wrong key": (401, other.request("POST", cancel, {"authorization": "Bearer sk-nobody-01234"})),
            "resume, no key": (401, other.request("GET", events)),
            "cancel, unknown id": (404, other.request("POST", f"/api/chat/{unknown}/cancel", auth())),
            "resume, unknown id": (404, other.request("GET", f"/api/chat/{unknown}/events", auth())),
            "cancel, no worker's id": (404, other.request("POST", f"/api/chat/{uuid.uuid4().hex}/cancel", auth())),
            "cancel, no such slot": (404, other.request("POST", f"/api/chat/w7-{uuid.uuid4().hex}/cancel", auth())),
        }
        for what, (expected, (status, headers, answer)) in answers.items():
            assert headers["x-sluice-worker"] == other.worker, what
            assert status == expected, (what, status, answer)
            code = json.loads(answer)["error"]["code"]
            assert code == ("not_found" if expected == 404 else "invalid_api_key"), (what, answer)
        # the owner answered the relayed ones itself (the others never left this worker)
        assert answers["cancel, key b"][1][1]["x-sluice-relayed-to"] == owner
        assert "x-sluice-relayed-to" not in answers["cancel, no key"][1][1]
        # none of it touched the stream
        for _ in range(10):
            assert stream.next()[1]["type"] == "delta"
        assert cancellations_for(gw, text) == []
        status, _, _ = other.request("POST", cancel, auth())
        assert status == 202
        assert stream.rest()[-1][1]["code"] == "cancelled"
    finally:
        stream.close()
        owner_connection.close()
        if other is not None:
            other.close()


def test_a_dead_workers_requests_are_not_found_from_the_other_worker(gw):
    text, body = prompt("relay dead", 1500, 20)
    owner_connection, stream = start(gw, {**body, "resumable": True})
    request_id, owner = stream.headers["x-request-id"], stream.headers["x-sluice-worker"]
    until_delta(stream)
    other = other_worker(gw, owner)
    try:
        os.kill(worker_pids(gw)[owner], signal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017 - the kernel closed the connection: its end
            stream.rest()
        # whether the relay finds no socket, or the replacement in the dead worker's slot:
        # the request died with its worker
        for method, path in (("POST", "cancel"), ("GET", "events")):
            status, headers, answer = other.request(method, f"/api/chat/{request_id}/{path}", auth())
            assert headers["x-sluice-worker"] == other.worker
            assert status == 404 and json.loads(answer)["error"]["code"] == "not_found", answer
        wait_until(lambda: cancellations_for(gw, text), timeout=10, message="the dead worker's call aborted")
        wait_until(lambda: worker_pids(gw).get(owner) is not None, timeout=15, message="a replacement")
    finally:
        stream.close()
        owner_connection.close()
        other.close()


def test_a_workers_private_socket_is_owner_only_and_grants_nothing_the_public_port_does_not(gw):
    # The relay's Unix sockets (edge/worker_relay.py) sit in a 0700 directory next to
    # SLUICE_DB; a peer that reaches one anyway (the same user) is asked for a key as on
    # the public port, and another key's request is as unknown there as anywhere.
    text, body = prompt("relay socket", 500, 20)
    owner_connection, stream = start(gw, {**body, "resumable": True})
    try:
        request_id, owner = stream.headers["x-request-id"], stream.headers["x-sluice-worker"]
        until_delta(stream)
        directory = os.path.join(os.path.dirname(os.path.abspath(gw.db)), f"workers-{gw.actor_port}")
        path = os.path.join(directory, f"{owner}.sock")
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert os.stat(path).st_mode & 0o777 == 0o600
        cancel = f"/api/chat/{request_id}/cancel".encode()
        with httpcore.ConnectionPool(uds=path) as direct:
            asked = {
                "no key": (401, direct.request("POST", b"http://worker" + cancel)),
                "key b": (404, direct.request("POST", b"http://worker" + cancel, headers=auth("b"))),
            }
        for what, (expected, response) in asked.items():
            assert response.status == expected, (what, response.content)
        for _ in range(5):  # the stream goes on untouched
            assert stream.next()[1]["type"] == "delta"
        assert cancellations_for(gw, text) == []
    finally:
        stream.close()
        owner_connection.close()
