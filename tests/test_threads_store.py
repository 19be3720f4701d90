"""The thread store's SQLite logic on its own (actors/threads_store.py `ThreadStore`), with
a real file: what a turn may send upstream."""

from __future__ import annotations

import pytest

from actors.threads_store import ThreadStore, ThreadTooLong

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
