"""patches/httpcore_h2_expiry.py: an idle HTTP/2 connection the server is closing has
expired; one that carries a stream, or a request on its way to one, has not, whatever
httpcore's own state says (it can read IDLE while a stream runs: the patch's docstring)."""

from __future__ import annotations

import asyncio
import time

import httpcore
import pytest
from httpcore._async import http2
from httpcore._models import Request

from patches import httpcore_h2_expiry
from patches.httpcore_h2_expiry import has_expired

pytestmark = pytest.mark.unit


class Socket:
    """The edge of the world: a network stream that says whether it has bytes to read."""

    def __init__(self, readable: bool):
        self.readable = readable

    def get_extra_info(self, name: str):
        return self.readable if name == "is_readable" else None


def connection(readable: bool, keepalive_s: float = 4.0) -> http2.AsyncHTTP2Connection:
    origin = httpcore.Origin(b"http", b"127.0.0.1", 1)
    return http2.AsyncHTTP2Connection(origin=origin, stream=Socket(readable), keepalive_expiry=keepalive_s)


def test_an_idle_connection_with_bytes_to_read_has_expired():
    assert not has_expired(connection(readable=False))
    assert has_expired(connection(readable=True))


def test_a_connection_httpcore_calls_idle_while_a_stream_runs_has_not_expired():
    conn = connection(readable=True)  # the running stream's tokens arrive
    conn._events[1] = []  # a registered stream, while httpcore's state is IDLE
    assert conn.is_idle() and not has_expired(conn)
    conn._expire_at = time.monotonic() - 1  # httpcore's keepalive ran out during a long stream
    assert not has_expired(conn)
    del conn._events[1]
    assert has_expired(conn)  # the stream ended: idle indeed


def test_a_request_on_its_way_to_a_stream_keeps_its_connection(monkeypatch):
    conn = connection(readable=True)
    seen = []

    async def httpcore_handles(self, request):  # before its stream is registered
        seen.append(has_expired(self))
        await asyncio.sleep(0)
        seen.append(has_expired(self))
        return "response"

    monkeypatch.setattr(httpcore_h2_expiry, "_original_handle_async_request", httpcore_handles)
    request = Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    assert asyncio.run(httpcore_h2_expiry.handle_async_request(conn, request)) == "response"
    assert seen == [False, False] and has_expired(conn)  # counted while it ran, not after
