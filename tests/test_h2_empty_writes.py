"""No write lock when HTTP/2 has nothing to write (patches/httpcore_h2_empty_writes.py), against
the simulated provider over h2c: a streamed answer takes httpcore's write path only for the
writes that carry bytes (the request, WINDOW_UPDATEs), and answers past the connection's
flow-control window still arrive whole (its WINDOW_UPDATEs went out)."""

from __future__ import annotations

import json
import logging

import pytest
from httpcore._async import http2

from patches import httpcore_h2_empty_writes as empty_writes
from patches import versions
from tests.support import run_with_h2_pool as run

pytestmark = pytest.mark.unit


def chat(text: str, **knobs) -> bytes:
    directive = "#sim " + " ".join(f"{k}={v}" for k, v in {"ttft_ms": 0, **knobs}.items())
    return json.dumps(
        {"model": "sim", "stream": True, "messages": [{"role": "user", "content": f"{text} {directive}"}]}
    ).encode()


async def post(pool, sim, content: bytes) -> bytes:
    headers = {"content-type": "application/json"}
    async with pool.stream("POST", sim.url + "/v1/chat/completions", content=content, headers=headers) as response:
        assert response.status == 200
        return b"".join([chunk async for chunk in response.aiter_stream()])


class Writes:
    """httpcore's own `_write_outgoing_data` runs, split by whether h2 had bytes to send."""

    def __init__(self):
        self.with_bytes = self.empty = 0

    def __enter__(self):
        self.original = empty_writes._original_write_outgoing_data
        writes = self

        async def counted(conn, request):
            if conn._h2_state._data_to_send:
                writes.with_bytes += 1
            else:
                writes.empty += 1
            await writes.original(conn, request)

        empty_writes._original_write_outgoing_data = counted
        return self

    def __exit__(self, *exc):
        empty_writes._original_write_outgoing_data = self.original


@pytest.fixture
def patched():
    before = http2.AsyncHTTP2Connection._write_outgoing_data
    assert empty_writes.install() and empty_writes.installed()
    assert empty_writes.install()  # idempotent
    yield
    http2.AsyncHTTP2Connection._write_outgoing_data = before


def test_a_streamed_answer_takes_the_write_path_only_for_bytes(patched):
    async def test(sim, pool):
        await post(pool, sim, chat("warm", tokens=2))  # the connection and its SETTINGS exchanged
        with Writes() as writes:
            raw = await post(pool, sim, chat("hello", tokens=50, token_interval_ms=1))
        assert raw.count(b"data: ") > 50 and raw.rstrip().endswith(b"data: [DONE]")
        assert writes.empty == 0  # without the patch: one or two per DATA frame
        assert writes.with_bytes >= 1  # the request itself

    run(test)


def test_answers_larger_than_the_connection_window_still_get_their_window_updates(patched):
    async def test(sim, pool):
        with Writes() as writes:
            total = 0
            for i in range(6):  # one connection: 6 x 3 MiB, past its 16.8 MB receive window
                raw = await post(pool, sim, chat(f"long{i}", tokens=3, fail="huge_frame", fail_after_tokens=1))
                assert raw.rstrip().endswith(b"data: [DONE]")
                total += len(raw)
        # httpcore opens each stream's window and the connection's by 2**24 and h2 asks
        # for more once half of it is used: the provider could not have sent all this if
        # the connection's WINDOW_UPDATEs had not gone out.
        assert total > 65_535 + 2**24
        assert writes.empty == 0 and writes.with_bytes >= 6 + 1  # the requests and an update

    run(test)


def test_without_the_patch_every_data_frame_takes_the_write_path():
    """What the patch saves (and that `Writes` sees it): httpcore's own connection."""
    before = http2.AsyncHTTP2Connection._write_outgoing_data
    http2.AsyncHTTP2Connection._write_outgoing_data = empty_writes._original_write_outgoing_data
    try:

        async def test(sim, pool):
            await post(pool, sim, chat("warm", tokens=2))
            original = http2.AsyncHTTP2Connection._write_outgoing_data
            counts = {"empty": 0}

            async def counted(conn, request):
                counts["empty"] += not conn._h2_state._data_to_send
                await original(conn, request)

            http2.AsyncHTTP2Connection._write_outgoing_data = counted
            await post(pool, sim, chat("hello", tokens=50, token_interval_ms=1))
            assert counts["empty"] >= 50

        run(test)
    finally:
        http2.AsyncHTTP2Connection._write_outgoing_data = before


def test_an_untested_h2_leaves_httpcore_as_it_is(monkeypatch, caplog):
    before = http2.AsyncHTTP2Connection._write_outgoing_data
    monkeypatch.setattr(http2.AsyncHTTP2Connection, "_write_outgoing_data", empty_writes._original_write_outgoing_data)
    real = versions.metadata.version
    monkeypatch.setattr("importlib.metadata.version", lambda name: "5.0.0" if name == "h2" else real(name))
    with caplog.at_level(logging.WARNING, logger="sluice.patches"):
        assert empty_writes.install() is False
    assert http2.AsyncHTTP2Connection._write_outgoing_data is empty_writes._original_write_outgoing_data
    assert not empty_writes.installed()
    (record,) = caplog.records
    assert "h2 4.x" in record.getMessage() and "5.0.0" in record.getMessage()
    monkeypatch.setattr(http2.AsyncHTTP2Connection, "_write_outgoing_data", before)
