"""An HTTP/2 request in one socket write (patches/httpcore_h2_one_write.py), against the
simulated provider over h2c: a small in-memory body goes out with its HEADERS in one write
and arrives whole; a body larger than the send window, a streamed body and a request with
no body go out as httpcore sends them, and arrive whole too."""

from __future__ import annotations

import json

import pytest
from httpcore._async import http2

from patches import httpcore_h2_one_write as one_write
from tests.support import run_with_h2_pool as run

pytestmark = pytest.mark.unit


def chat(text: str) -> bytes:
    return json.dumps(
        {"model": "sim", "stream": True, "messages": [{"role": "user", "content": f"{text} #sim tokens=2 ttft_ms=0"}]}
    ).encode()


class Writes:
    """The socket writes made while a request's HEADERS and body are sent."""

    def __init__(self):
        self.sending = False
        self.count = 0

    def __enter__(self):
        cls = http2.AsyncHTTP2Connection
        self.originals = cls._send_request_headers, cls._send_request_body, cls._write_outgoing_data
        send_headers, send_body, write = self.originals
        writes = self

        async def headers(conn, request, stream_id):
            writes.sending = True
            await send_headers(conn, request, stream_id)

        async def body(conn, request, stream_id):
            try:
                await send_body(conn, request, stream_id)
            finally:
                writes.sending = False

        async def counted(conn, request):
            writes.count += writes.sending
            await write(conn, request)

        cls._send_request_headers, cls._send_request_body, cls._write_outgoing_data = headers, body, counted
        return self

    def __exit__(self, *exc):
        cls = http2.AsyncHTTP2Connection
        cls._send_request_headers, cls._send_request_body, cls._write_outgoing_data = self.originals


async def post(pool, sim, content, length: int | None = None) -> bytes:
    headers = {"content-type": "application/json"}
    if length is not None:  # a streamed body's length, given in advance
        headers["content-length"] = str(length)
    async with pool.stream("POST", sim.url + "/v1/chat/completions", content=content, headers=headers) as response:
        assert response.status == 200
        return b"".join([chunk async for chunk in response.aiter_stream()])


def received(sim) -> str:
    return sim.requests[-1]["body"]["messages"][0]["content"]


@pytest.fixture
def patched():
    cls = http2.AsyncHTTP2Connection
    before = cls._send_request_headers, cls._send_request_body
    assert one_write.install() and one_write.installed()
    yield
    cls._send_request_headers, cls._send_request_body = before


@pytest.mark.parametrize("size", [10, 40_000], ids=["one frame", "three frames"])
def test_a_request_whose_body_fits_the_window_goes_out_in_one_write(patched, size):
    text = "x" * size

    async def test(sim, pool):
        await post(pool, sim, chat("warm"))  # the connection and its SETTINGS exchanged
        with Writes() as writes:
            raw = await post(pool, sim, chat(text))
        assert writes.count == 1  # httpcore's own: HEADERS, each DATA frame, END_STREAM
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert received(sim).startswith(text)

    run(test)


def test_the_first_request_on_a_new_connection_goes_out_in_one_write_too(patched):
    async def test(sim, pool):
        with Writes() as writes:
            raw = await post(pool, sim, chat("first"))
        assert writes.count == 1
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert received(sim).startswith("first")

    run(test)


@pytest.mark.parametrize("warm", [True, False], ids=["over the size cap", "over a new connection's window"])
def test_a_larger_body_is_sent_as_httpcore_sends_it(patched, warm):
    text = "y" * (one_write.ONE_WRITE_MAX + 1 if warm else 70_000)  # a new stream's window: 65,535

    async def test(sim, pool):
        if warm:
            await post(pool, sim, chat("warm"))
        with Writes() as writes:
            raw = await post(pool, sim, chat(text))
        assert writes.count > 2
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert received(sim).startswith(text)

    run(test)


def test_a_streamed_body_and_a_request_without_one_are_sent_as_httpcore_sends_them(patched):
    async def parts():
        yield chat("streamed")

    async def test(sim, pool):
        with Writes() as writes:
            raw = await post(pool, sim, parts(), len(chat("streamed")))
        assert writes.count == 3
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert received(sim).startswith("streamed")
        response = await pool.request("GET", sim.url + "/healthz")
        assert response.status == 200

    run(test)
