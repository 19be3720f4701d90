"""RST_STREAM for every HTTP/2 stream the Pool gives up (patches/httpcore_rst_stream.py),
against the simulated provider over h2c: a stream cancelled while it waits for its
response headers is reset too, not only one whose response had begun, so the provider
stops generating a call nobody listens to; a stream that ended normally is never reset."""

from __future__ import annotations

import asyncio
import json

import pytest

from patches import httpcore_rst_stream
from tests.support import run_with_h2_pool as run

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


def body(text: str) -> bytes:
    return json.dumps({"model": "sim", "stream": True, "messages": [{"role": "user", "content": text}]}).encode()


async def ask(pool, sim, text: str) -> bytes:
    async with pool.stream("POST", sim.url + CHAT, content=body(text)) as response:
        return b"".join([chunk async for chunk in response.aiter_stream()])


async def until(predicate, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            await asyncio.sleep(0.005)
        return value


def test_a_stream_cancelled_before_its_headers_is_reset():
    httpcore_rst_stream.install()

    async def test(sim, pool):
        task = asyncio.create_task(ask(pool, sim, "wait #sim fail=stall_first"))
        await until(lambda: sim.stats()["streams_open"] == 1)  # the provider has it, no headers sent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await until(lambda: (s := sim.stats())["cancellations"] and s)
        assert stats["cancellations"][0]["reason"] == "stream_reset"
        assert stats["streams_open"] == 0
        # The connection goes on serving, and a stream that ended normally is not reset.
        assert b"[DONE]" in await ask(pool, sim, "next #sim tokens=2 ttft_ms=0")
        assert sim.stats()["streams_cancelled"] == 1 and sim.stats()["streams_completed"] == 1
        assert len({r["conn_id"] for r in sim.stats()["requests"]}) == 1

    run(test)


def test_a_stream_timed_out_before_its_headers_is_reset():
    """A read timeout with no headers (a provider that never answers): reset as well."""
    httpcore_rst_stream.install()
    import httpcore

    async def test(sim, pool):
        with pytest.raises(httpcore.ReadTimeout):
            async with pool.stream(
                "POST",
                sim.url + CHAT,
                content=body("wait #sim fail=stall_first"),
                extensions={"timeout": {"read": 0.3}},
            ):
                pass
        stats = await until(lambda: (s := sim.stats())["cancellations"] and s)
        assert stats["cancellations"][0]["reason"] == "stream_reset"

    run(test)
