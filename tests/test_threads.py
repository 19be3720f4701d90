"""Chat threads on the real system with a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpcore
import pytest

from tests.support import Gateway, SSEClient, data_events, get_json, request, stream_chat, wait_until, worker_pids

pytestmark = pytest.mark.integration


def new_thread(url: str) -> str:
    status, _, body = request("POST", url + "/api/threads")
    assert status == 201
    return json.loads(body)["thread_id"]


def messages(url: str, thread_id: str) -> list[dict]:
    status, body = get_json(f"{url}/api/threads/{thread_id}/messages")
    assert status == 200
    return body["messages"]


def calls_for(gateway, text: str) -> list[dict]:
    stats = get_json(gateway.sim + "/stats")[1]
    needle = text.split("\n")[0]  # json.dumps escapes the newline before a #sim line
    return [r for r in stats["requests"] if needle in json.dumps(r["body"])]


def test_a_thread_keeps_its_history_and_sends_it_upstream(gateway):
    thread = new_thread(gateway.url)
    first = f"first {uuid.uuid4().hex}\n#sim tokens=3"
    _, _, events = stream_chat(f"{gateway.url}/api/threads/{thread}/messages", {"content": first})
    reply = "".join(d["delta"] for d in data_events(events) if d["type"] == "delta")
    assert data_events(events)[-1]["type"] == "done"
    second = f"second {uuid.uuid4().hex}\n#sim tokens=2"
    stream_chat(f"{gateway.url}/api/threads/{thread}/messages", {"content": second})
    stored = wait_until(lambda: (lambda ms: ms if ms[-1]["status"] == "done" else None)(messages(gateway.url, thread)))
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "done"),
        ("user", "complete"),
        ("assistant", "done"),
    ]
    assert stored[0]["content"] == first and stored[1]["content"] == reply
    upstream = calls_for(gateway, second)[0]["body"]["messages"]
    assert [m["content"] for m in upstream] == [first, reply, second]


def test_50_identical_sends_store_2_messages_and_make_1_upstream_call(gateway):
    thread = new_thread(gateway.url)
    # ~1 s in flight: on a loaded machine the last of the 50 sends still finds the reply
    # streaming (one after its end is a new turn, with its own call; CI once saw that).
    text = f"burst {uuid.uuid4().hex}\n#sim ttft_ms=300 tokens=6 token_interval_ms=150"
    url = f"{gateway.url}/api/threads/{thread}/messages"
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: stream_chat(url, {"content": text}), range(50)))
    assert [status for status, _, _ in results] == [200] * 50
    replies = {"".join(d["delta"] for d in data_events(ev) if d["type"] == "delta") for _, _, ev in results}
    assert len(replies) == 1 and all(data_events(ev)[-1]["type"] == "done" for _, _, ev in results)
    stored = wait_until(lambda: (lambda ms: ms if ms[-1]["status"] == "done" else None)(messages(gateway.url, thread)))
    assert len(stored) == 2 and stored[1]["content"] == replies.pop()
    assert len(calls_for(gateway, text)) == 1


def test_a_cancelled_reply_is_stored_with_the_text_so_far(gateway):
    thread = new_thread(gateway.url)
    client = SSEClient(
        f"{gateway.url}/api/threads/{thread}/messages", {"content": "slow\n#sim tokens=500 token_interval_ms=20"}
    )
    received = []
    while len(received) < 2:
        name, data = client.next()
        if data.get("type") == "delta":
            received.append(data["delta"])
    client.close()
    stored = wait_until(
        lambda: (lambda ms: ms if ms[-1]["status"] == "cancelled" else None)(messages(gateway.url, thread))
    )
    assert stored[-1]["content"].startswith("".join(received))


def test_unknown_thread_and_bad_input(gateway):
    status, _, body = request("POST", f"{gateway.url}/api/threads/nope/messages", {"content": "hi"})
    assert status == 404 and json.loads(body)["error"]["code"] == "thread_not_found"
    assert request("GET", f"{gateway.url}/api/threads/nope/messages")[0] == 404
    thread = new_thread(gateway.url)
    status, _, body = request("POST", f"{gateway.url}/api/threads/{thread}/messages", {"content": ""})
    assert status == 422 and "content" in json.loads(body)["error"]["message"]
    status, _, _ = request(
        "POST", f"{gateway.url}/api/threads/{thread}/messages", b"{oops", {"content-type": "application/json"}
    )
    assert status == 400
    assert messages(gateway.url, thread) == []


def test_a_crash_mid_stream_leaves_the_reply_marked_interrupted():
    gw = Gateway().start()
    try:
        thread = new_thread(gw.url)
        client = SSEClient(
            f"{gw.url}/api/threads/{thread}/messages", {"content": "long\n#sim tokens=1000 token_interval_ms=20"}
        )
        while client.next()[1].get("type") != "delta":
            pass
        gw.proc.send_signal(signal.SIGKILL)  # no goodbye: the reply row stays "streaming"
        gw.proc.wait(10)
        client.close()
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=20, message="the killed gateway to be gone")
        status = sqlite3.connect(gw.db).execute("SELECT status FROM messages WHERE role='assistant'").fetchone()[0]
        assert status == "streaming"
        again = Gateway({"SLUICE_DB": gw.db}).start()  # a restart marks it
        try:
            assert [m["status"] for m in messages(again.url, thread)] == ["complete", "interrupted"]
        finally:
            again.stop()
            again.kill_leftovers()
    finally:
        gw.stop()
        gw.kill_leftovers()


def test_a_send_that_would_take_the_history_past_the_body_limit_is_413_and_stores_nothing(sim):
    # The history goes upstream as one body: on main a thread grew by a body's worth per send,
    # and every later send carried all of it (30 MB after 30 sends of 1 MB).
    gw = Gateway({"SIMULATED_BASE_URL": sim, "SLUICE_MAX_BODY_BYTES": "4096"}).start()
    try:
        thread = new_thread(gw.url)
        first = "x" * 3000 + "\n#sim tokens=3"
        status, _, events = stream_chat(f"{gw.url}/api/threads/{thread}/messages", {"content": first})
        assert status == 200 and data_events(events)[-1]["type"] == "done"
        stored = messages(gw.url, thread)
        status, _, body = request("POST", f"{gw.url}/api/threads/{thread}/messages", {"content": "y" * 1500})
        assert status == 413, body  # on main: 200, a reply to a 4,500-byte history
        error = json.loads(body)["error"]
        assert error["code"] == "thread_too_long", body
        assert "SLUICE_MAX_BODY_BYTES (4096)" in error["message"] and "new thread" in error["message"]
        assert messages(gw.url, thread) == stored  # nothing stored for the refused turn
        status, _, events = stream_chat(f"{gw.url}/api/threads/{thread}/messages", {"content": "short\n#sim tokens=2"})
        assert status == 200 and data_events(events)[-1]["type"] == "done"  # what still fits is served
    finally:
        gw.stop()
        gw.kill_leftovers()


def test_a_reply_whose_edge_worker_dies_is_marked_interrupted(sim):
    # On main the row stayed "streaming" until the thread store itself restarted: the store
    # learnt of a gateway crash, not of one edge worker's.
    gw = Gateway({"SIMULATED_BASE_URL": sim, "SLUICE_WORKERS": "2"}).start()
    try:
        wait_until(lambda: len(worker_pids(gw)) == 2, timeout=20, message="two workers")
        thread = new_thread(gw.url)
        client = SSEClient(
            f"{gw.url}/api/threads/{thread}/messages", {"content": "long\n#sim tokens=1000 token_interval_ms=20"}
        )
        while client.next()[1].get("type") != "delta":
            pass
        gw.tree |= set(worker_pids(gw).values())
        os.kill(worker_pids(gw)[client.headers["x-sluice-worker"]], signal.SIGKILL)
        client.close()

        def settled():
            try:
                stored = messages(gw.url, thread)
            except httpcore.ReadError:  # a kept-alive connection to the killed worker
                return None
            return stored if stored[-1]["status"] != "streaming" else None

        stored = wait_until(settled, timeout=20, message="the reply no longer streaming")
        assert [m["status"] for m in stored] == ["complete", "interrupted"]
        status, _, events = stream_chat(f"{gw.url}/api/threads/{thread}/messages", {"content": "again\n#sim tokens=2"})
        assert status == 200 and data_events(events)[-1]["type"] == "done"  # the thread goes on
    finally:
        gw.stop()
        gw.kill_leftovers()


def test_a_send_answered_503_because_the_store_was_frozen_stores_nothing(gateway):
    # On main the store did the TurnBegin once it thawed: a user message the client was told
    # was not taken sat in the thread, was sent upstream with every later turn, and its
    # reply stayed "streaming" for ever.
    thread = new_thread(gateway.url)
    store = get_json(gateway.url + "/readyz")[1]["actors"]["threads"]["pid"]
    os.kill(store, signal.SIGSTOP)
    try:
        status, _, body = request(
            "POST", f"{gateway.url}/api/threads/{thread}/messages", {"content": "lost\n#sim tokens=2"}, timeout=30
        )
    finally:
        os.kill(store, signal.SIGCONT)
    assert status == 503 and json.loads(body)["error"]["code"] == "threads_unavailable", body
    second = f"kept {uuid.uuid4().hex}\n#sim tokens=2"
    status, _, events = stream_chat(f"{gateway.url}/api/threads/{thread}/messages", {"content": second})
    assert status == 200 and data_events(events)[-1]["type"] == "done"
    stored = messages(gateway.url, thread)
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "done")], stored
    assert stored[0]["content"] == second
    assert [m["content"] for m in calls_for(gateway, second)[0]["body"]["messages"]] == [second]


def test_a_send_refused_at_admission_stores_nothing(gateway):
    """A refusal after the turn was stored (here a model name over 256 characters, 422) used
    to leave the user message and an `error` reply in the thread: the message went upstream
    with every later turn, and the client's retry stored it twice."""
    thread = new_thread(gateway.url)
    refused = {"content": "refused\n#sim tokens=2", "model": "m" * 300}
    status, _, body = request("POST", f"{gateway.url}/api/threads/{thread}/messages", refused)
    assert status == 422, body
    wait_until(lambda: messages(gateway.url, thread) == [], timeout=10, message="the refused turn to be undone")
    second = f"kept {uuid.uuid4().hex}\n#sim tokens=2"
    status, _, events = stream_chat(f"{gateway.url}/api/threads/{thread}/messages", {"content": second})
    assert status == 200 and data_events(events)[-1]["type"] == "done"
    assert [m["content"] for m in calls_for(gateway, second)[0]["body"]["messages"]] == [second]
