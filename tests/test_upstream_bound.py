"""Unit tests for the bound on an upstream call's whole duration (actors/upstream.py
`run_call`, UPSTREAM_MAX_DURATION_S), with a fake connection pool: the real gateway and
simulated provider are in tests/test_max_duration.py."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from actors.upstream import run_call
from protocols.providers import get_adapter

pytestmark = pytest.mark.unit

CHUNK = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
END = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"


class Response:
    status = 200
    headers = [(b"content-type", b"text/event-stream")]
    stream = None  # no HTTP/2 stream for patches/httpcore_rst_stream.py to reset

    def __init__(self, chunks: list[bytes], gap_s: float):
        self.chunks, self.gap_s = chunks, gap_s

    async def aiter_stream(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.gap_s)
            yield chunk


class Pool:
    """Stands in for httpcore's pool: one streamed answer, its close taking `close_s`."""

    def __init__(self, chunks: list[bytes], gap_s: float = 0.0, close_s: float = 0.0):
        self.response, self.close_s = Response(chunks, gap_s), close_s

    @contextlib.asynccontextmanager
    async def stream(self, *args, **kwargs):
        try:
            yield self.response
        finally:
            await asyncio.sleep(self.close_s)


def call(pool: Pool, max_duration_s: float | None) -> tuple[list[str], object]:
    published: list[dict] = []
    request = ("POST", "http://provider.invalid/v1/chat/completions", [], b"{}")
    result = asyncio.run(
        run_call(
            pool, get_adapter("openai"), request, published.extend, 0.0, {"read": 60}, max_duration_s=max_duration_s
        )
    )
    return [e["type"] for e in published], result


def test_an_answer_that_outlasts_the_bound_ends_with_one_timeout_after_what_it_streamed():
    kinds, result = call(Pool([CHUNK] * 50, gap_s=0.01), max_duration_s=0.1)
    assert kinds[0] == "started" and "delta" in kinds and kinds[-1] == "error" and kinds.count("error") == 1
    assert result.outcome == "error" and result.error["code"] == "upstream_timeout"
    assert "UPSTREAM_MAX_DURATION_S" in result.error["message"]


def test_the_bound_stops_once_the_answer_is_whole_a_slow_close_keeps_it_done():
    """The bound used to run on while the response closed, after `done`: a delivered answer
    became an error (a second terminal event, an error replayed to identical requests)."""
    kinds, result = call(Pool([CHUNK, END, DONE], close_s=0.3), max_duration_s=0.1)
    assert kinds == ["started", "delta", "done"] and result.outcome == "done"


@pytest.mark.parametrize("off", [0, None])
def test_zero_or_none_is_no_bound(off):
    kinds, result = call(Pool([CHUNK] * 5 + [END, DONE], gap_s=0.02), max_duration_s=off)
    assert kinds[-1] == "done" and result.outcome == "done"
