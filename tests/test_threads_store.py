"""The thread store's SQLite logic on its own (actors/threads_store.py `ThreadStore`), with
a real file: what a turn may send upstream."""

from __future__ import annotations

import pytest

from actors.threads_store import Listeners, ThreadStore, ThreadTooLong

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path):
    store = ThreadStore(str(tmp_path / "threads.db"))
    yield store
    store.close()


def test_a_turn_whose_history_would_pass_the_body_limit_is_refused_and_stores_nothing(store):
    thread, _ = store.create()
    _, _, assistant, _ = store.begin(thread, "a" * 400, max_bytes=1000)
    store.end(assistant, "é" * 200, "done", None)  # 400 bytes in UTF-8
    before = store.messages(thread)
    with pytest.raises(ThreadTooLong, match="1201 bytes"):
        store.begin(thread, "b" * 401, max_bytes=1000)  # 400 + 400 + 401 > 1000
    assert store.messages(thread) == before  # neither the user message nor a reply row
    history, _, _, joined = store.begin(thread, "c" * 200, max_bytes=1000)  # 1000: still fits
    assert not joined and [len(m["content"]) for m in history] == [400, 200, 200]


def test_a_send_that_joins_the_turn_streaming_is_not_counted_again(store):
    thread, _ = store.create()
    store.begin(thread, "a" * 600, max_bytes=1000)
    assert store.begin(thread, "a" * 600, max_bytes=1000)[3] is True  # joined, nothing stored


def test_interrupt_marks_only_replies_still_streaming(store):
    thread, _ = store.create()
    _, _, streaming, _ = store.begin(thread, "one")
    _, _, finished, _ = store.begin(thread, "two")
    store.end(finished, "answer", "done", None)
    assert store.interrupt([streaming, finished]) == 1
    assert [m["status"] for m in store.messages(thread)] == ["complete", "interrupted", "complete", "done"]
    store.end(streaming, "late but whole", "done", None)  # an edge still alive may yet store it
    assert store.messages(thread)[1]["status"] == "done"


def test_unbegin_deletes_a_turn_only_while_its_reply_streams(store):
    thread, _ = store.create()
    _, user, assistant, _ = store.begin(thread, "given up on")
    assert store.unbegin(assistant, user) is True and store.messages(thread) == []
    _, user, assistant, _ = store.begin(thread, "answered")
    store.end(assistant, "whole", "done", None)
    assert store.unbegin(assistant, user) is False and len(store.messages(thread)) == 2


def test_listeners_a_turn_abandoned_by_its_only_request_is_undone_and_not_by_a_joiner():
    listeners = Listeners()
    listeners.begun("t1", "edge-a", assistant_id=2, user_id=1, joined=False)
    listeners.begun("t2", "edge-b", assistant_id=2, user_id=1, joined=True)
    assert listeners.abandon("t1") is None  # t2 still streams reply 2
    assert listeners.abandon("t2") == (2, 1)  # nobody does now: the user message 1 goes with it
    assert listeners.replies == {} and listeners.turn_of == {}


def test_listeners_an_abandon_before_its_turn_begin_refuses_that_begin_once():
    listeners = Listeners(remember=2)
    assert listeners.abandon("early") is None
    assert listeners.was_abandoned("early") is True and listeners.was_abandoned("early") is False
    for token in ("a", "b", "c"):
        listeners.abandon(token)
    assert list(listeners.abandoned) == ["b", "c"]  # bounded: the oldest forgotten


def test_listeners_an_edge_lost_orphans_only_the_replies_nobody_else_streams():
    listeners = Listeners()
    listeners.begun("t1", "edge-a", assistant_id=2, user_id=1, joined=False)
    listeners.begun("t2", "edge-b", assistant_id=2, user_id=1, joined=True)
    listeners.begun("t3", "edge-a", assistant_id=4, user_id=3, joined=False)
    assert listeners.edge_lost("edge-a") == [4]
    assert listeners.edge_lost("edge-b") == [2]
    listeners.begun("t5", "edge-c", assistant_id=6, user_id=5, joined=False)
    listeners.ended(6)
    assert listeners.edge_lost("edge-c") == [] and listeners.turn_of == {}
