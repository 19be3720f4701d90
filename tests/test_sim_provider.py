"""Tests for the simulated LLM provider (sim/provider.py, sim/formats.py).

Real sockets on loopback, real clients (httpcore over HTTP/2 prior knowledge
and HTTP/1.1).  Each test runs its own event loop with ``asyncio.run`` (no
pytest-asyncio) and its own server, and checks that nothing is left running.
Waiting is done by polling with deadlines, never by fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpcore
import pytest

from patches import httpcore_rst_stream
from sim import formats
from sim.provider import SimulatedProvider, start_subprocess, stop_subprocess

pytestmark = pytest.mark.unit

TEST_TIMEOUT = 30.0
CHAT = "/v1/chat/completions"
PROTOCOLS = ["h2", "http/1.1"]


# ------------------------------------------------------------------ helpers


def run_with_sim(test, **config):
    """Run ``await test(sim)`` against a fresh provider; fail if tasks are left behind."""

    async def main():
        async with asyncio.timeout(TEST_TIMEOUT), SimulatedProvider() as sim:
            sim.config.update(config)
            await test(sim)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, f"tasks still running after stop(): {leftover}"
        return sim

    return asyncio.run(main())


def make_pool(protocol: str) -> httpcore.AsyncConnectionPool:
    if protocol == "h2":
        return httpcore.AsyncConnectionPool(http2=True, http1=False)  # h2c prior knowledge
    return httpcore.AsyncConnectionPool()


def chat(text: str, stream: bool = True, **extra) -> bytes:
    body = {"model": "sim-test", "messages": [{"role": "user", "content": text}], "stream": stream}
    body.update(extra)
    return json.dumps(body).encode()


def parse_sse(raw: bytes) -> list:
    """SSE ``data:`` payloads: parsed JSON objects, or the string "[DONE]"."""
    events = []
    for frame in raw.split(b"\n\n"):
        if not frame.strip():
            continue
        assert frame.startswith(b"data: "), frame
        data = frame[len(b"data: ") :]
        events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def token_text(events: list) -> list[str]:
    return [
        e["choices"][0]["delta"]["content"]
        for e in events
        if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")
    ]


async def post(pool, sim, body: bytes, path: str = CHAT):
    """Whole-response POST: (status, headers dict, body bytes)."""
    resp = await pool.request("POST", sim.url + path, content=body, headers={"content-type": "application/json"})
    return resp.status, {k.decode().lower(): v.decode() for k, v in resp.headers}, resp.content


async def get_json(sim, path: str, method: str = "GET", body: bytes | None = None):
    async with httpcore.AsyncConnectionPool() as pool:
        resp = await pool.request(method, sim.url + path, content=body)
        return resp.status, json.loads(resp.content)


async def read_tokens(chunks, want: int) -> bytes:
    """Read a streamed response until ``want`` token chunks have arrived."""
    raw = b""
    while len(token_text(parse_sse(raw.rpartition(b"\n\n")[0]))) < want:  # whole frames only
        raw += await chunks.__anext__()
    return raw


async def poll(predicate, timeout: float = 5.0):
    """Poll ``predicate()`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.001)


# ------------------------------------------------------------------ pure formats


def test_directive_parsing():
    text = "please answer\n#sim ttft_ms=5 tokens=3 fail=500\nmore text"
    assert formats.parse_directive(text) == {"ttft_ms": 5, "tokens": 3, "fail": "500"}
    assert formats.parse_directive("#sim token_interval_ms=2.5 fail=stall") == {
        "token_interval_ms": 2.5,
        "fail": "stall",
    }
    assert formats.parse_directive("no directive here") == {}
    for bad in ("#sim tokenz=3", "#sim fail=boom", "#sim tokens=-1", "#sim tokens=2.5", "#sim ttft_ms"):
        with pytest.raises(formats.KnobError):
            formats.parse_directive(bad)


def test_tokens_are_deterministic_words():
    convo = [{"role": "user", "content": "hello"}]
    first = formats.make_tokens(convo, 12)
    assert first == formats.make_tokens(json.loads(json.dumps(convo)), 12)
    assert formats.make_tokens(convo, 5) == first[:5]
    assert all(t.endswith(" ") and t[:-1] in formats.WORDS for t in first)
    assert formats.make_tokens([{"role": "user", "content": "other"}], 12) != first


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_chunks_and_done(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            t0 = time.monotonic()
            async with pool.stream(
                "POST",
                sim.url + CHAT,
                content=chat("hi #sim tokens=4 ttft_ms=300"),
                headers={"content-type": "application/json"},
            ) as resp:
                headers_after = time.monotonic() - t0
                assert resp.status == 200
                assert resp.extensions["http_version"] == (b"HTTP/2" if protocol == "h2" else b"HTTP/1.1")
                assert dict(resp.headers)[b"content-type"] == b"text/event-stream"
                chunks = resp.aiter_stream()
                first = await chunks.__anext__()
                first_after = time.monotonic() - t0
                raw = first + b"".join([c async for c in chunks])
        # Headers at once, body after ttft.
        assert headers_after < 0.25
        assert first_after >= 0.29

        events = parse_sse(raw)
        assert events[-1] == "[DONE]"
        objs = events[:-1]
        assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert len(token_text(objs)) == 4
        assert objs[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        assert len(objs) == 1 + 4 + 1  # role chunk, tokens, finish chunk; no usage chunk
        for obj in objs:
            assert obj["object"] == "chat.completion.chunk"
            assert obj["id"] == objs[0]["id"] and obj["id"].startswith("chatcmpl-")
            assert obj["model"] == "sim-test" and isinstance(obj["created"], int)
            assert "usage" not in obj

        stats = sim.stats()
        assert stats["calls"] == 1 and stats["streams_completed"] == 1 and stats["streams_open"] == 0
        record = stats["requests"][0]
        assert record["protocol"] == protocol and record["path"] == CHAT
        assert record["body"]["messages"][0]["content"] == "hi #sim tokens=4 ttft_ms=300"
        assert record["first_byte_at"] - record["started_at"] >= 0.29

    run_with_sim(test)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_same_request_same_tokens(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            answers = []
            for text in ("what is a river?", "what is a river?", "what is a stone?"):
                status, _, raw = await post(pool, sim, chat(text))
                assert status == 200
                answers.append("".join(token_text(parse_sse(raw))))
        assert answers[0] == answers[1]
        assert answers[0] != answers[2]
        assert len(answers[0].split()) == formats.DEFAULT_KNOBS["tokens"]

    run_with_sim(test, ttft_ms=0, token_interval_ms=0)


def test_include_usage():
    async def test(sim):
        async with make_pool("h2") as pool:
            body = chat("count me #sim tokens=5", stream_options={"include_usage": True})
            _, _, raw = await post(pool, sim, body)
        events = parse_sse(raw)
        assert events[-1] == "[DONE]"
        usage_chunk = events[-2]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == 5
        assert usage_chunk["usage"]["total_tokens"] == (
            usage_chunk["usage"]["prompt_tokens"] + usage_chunk["usage"]["completion_tokens"]
        )
        assert events[-3]["choices"][0]["finish_reason"] == "stop"
        assert all(e["usage"] is None for e in events[:-2])  # like the real API

    run_with_sim(test, ttft_ms=0, token_interval_ms=0)


def test_non_streaming_completion():
    async def test(sim):
        async with make_pool("h2") as pool:
            status, headers, raw = await post(pool, sim, chat("hello #sim tokens=6", stream=False))
            _, _, streamed = await post(pool, sim, chat("hello #sim tokens=6"))
        assert status == 200 and headers["content-type"] == "application/json"
        obj = json.loads(raw)
        assert obj["object"] == "chat.completion"
        choice = obj["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == "".join(token_text(parse_sse(streamed)))
        assert obj["usage"]["completion_tokens"] == 6

    run_with_sim(test, ttft_ms=0, token_interval_ms=0)


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_429_with_retry_after(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            status, headers, raw = await post(pool, sim, chat("hi #sim fail=429"))
            assert (status, headers["retry-after"]) == (429, "1")
            error = json.loads(raw)["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert error["message"]
            status, headers, _ = await post(pool, sim, chat("hi #sim fail=429 retry_after_s=7"))
            assert (status, headers["retry-after"]) == (429, "7")
        assert sim.stats()["calls"] == 2

    run_with_sim(test)


def test_500():
    async def test(sim):
        async with make_pool("h2") as pool:
            status, headers, raw = await post(pool, sim, chat("hi #sim fail=500"))
        assert status == 500 and headers["content-type"] == "application/json"
        assert json.loads(raw)["error"]["type"] == "server_error"

    run_with_sim(test)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reset_mid(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            raw = b""
            with pytest.raises(httpcore.RemoteProtocolError):
                async with pool.stream("POST", sim.url + CHAT, content=chat("hi #sim fail=reset_mid")) as resp:
                    assert resp.status == 200
                    async for chunk in resp.aiter_stream():
                        raw += chunk
        events = parse_sse(raw)
        assert len(token_text(events)) == 3  # fail_after_tokens default
        assert "[DONE]" not in events
        stats = await poll(lambda: (s := sim.stats())["streams_aborted"] == 1 and s)
        assert stats["requests"][0]["tokens_sent"] == 3 and stats["streams_open"] == 0

    run_with_sim(test, ttft_ms=0, token_interval_ms=1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fail_times_fails_the_first_calls_of_a_body_then_answers(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            body = chat("flaky #sim fail=503 fail_times=2 tokens=2")
            statuses = [(await post(pool, sim, body))[0] for _ in range(3)]
            other = (await post(pool, sim, chat("other #sim fail=503 fail_times=2")))[0]
        assert statuses == [503, 503, 200] and other == 503  # counted per body
        assert [r["fail"] for r in sim.stats()["requests"]] == ["503", "503", "none", "503"]

    run_with_sim(test, ttft_ms=0, token_interval_ms=0)


def test_429_without_retry_after():
    async def test(sim):
        async with make_pool("h2") as pool:
            status, headers, _ = await post(pool, sim, chat("hi #sim fail=429 retry_after_s=none"))
        assert status == 429 and "retry-after" not in headers

    run_with_sim(test)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reset_first_resets_before_any_response_byte(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            with pytest.raises(httpcore.RemoteProtocolError):
                await post(pool, sim, chat("hi #sim fail=reset_first"))
        stats = await poll(lambda: (s := sim.stats())["streams_aborted"] == 1 and s)
        assert stats["requests"][0]["first_byte_at"] is None

    run_with_sim(test)


def test_idle_close_sends_goaway_and_closes_an_idle_h2_connection():
    async def test(sim):
        async with make_pool("h2") as pool:
            status, _, _ = await post(pool, sim, chat("hi #sim tokens=1"))
            assert status == 200
            await poll(lambda: sim.stats()["idle_closes"] == 1)
            (conn,) = pool.connections
            # what the Pool's h2_expiry patch relies on: the closed connection is readable
            assert conn._connection._network_stream.get_extra_info("is_readable")

    run_with_sim(test, ttft_ms=0, token_interval_ms=0, idle_close_s=0.2)


def test_truncate_ends_cleanly_without_finish():
    async def test(sim):
        async with make_pool("h2") as pool:
            status, _, raw = await post(pool, sim, chat("hi #sim fail=truncate tokens=5"))
        assert status == 200
        events = parse_sse(raw)
        assert len(token_text(events)) == 5
        assert "[DONE]" not in events
        assert all(e["choices"][0]["finish_reason"] is None for e in events)
        assert sim.stats()["streams_completed"] == 1

    run_with_sim(test, ttft_ms=0, token_interval_ms=0)


async def _abort(protocol, resp):
    """Client goes away: RST_STREAM on HTTP/2; closing the connection on HTTP/1.1."""
    if protocol == "h2":
        httpcore_rst_stream.install()
        await httpcore_rst_stream.reset(resp)
    # httpcore closes an HTTP/1.1 connection whose response is closed unfinished.
    await resp.aclose()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stall_then_client_abort_is_observed(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            async with pool.stream(
                "POST", sim.url + CHAT, content=chat("hi #sim fail=stall fail_after_tokens=2")
            ) as resp:
                chunks = resp.aiter_stream()
                raw = await read_tokens(chunks, 2)
                assert len(token_text(parse_sse(raw))) == 2
                # Stalled: still open on the server, nothing more coming.
                assert sim.stats()["streams_open"] == 1
                closed_at = time.time()
                await _abort(protocol, resp)
                await chunks.aclose()  # finalize the generator now, not from GC
                stats = await poll(lambda: (s := sim.stats())["cancellations"] and s)
        cancel = stats["cancellations"][0]
        assert cancel["call_id"] == stats["requests"][0]["call_id"]
        assert cancel["tokens_sent"] == 2
        assert 0 <= cancel["observed_at"] - closed_at < 0.25
        assert stats["streams_open"] == 0 and stats["streams_cancelled"] == 1

    run_with_sim(test, ttft_ms=0, token_interval_ms=1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_closing_early_cancels_generation(protocol):
    async def test(sim):
        async with make_pool(protocol) as pool:
            async with pool.stream("POST", sim.url + CHAT, content=chat("long #sim tokens=1000")) as resp:
                chunks = resp.aiter_stream()
                await read_tokens(chunks, 3)
                closed_at = time.time()
                await _abort(protocol, resp)
                await chunks.aclose()  # finalize the generator now, not from GC
                stats = await poll(lambda: (s := sim.stats())["cancellations"] and s)
            # The server keeps serving on a fresh request afterwards.
            status, _, _ = await post(pool, sim, chat("next #sim tokens=1"))
            assert status == 200
            if protocol == "h2":  # a reset stream does not take its connection down
                assert len({r["conn_id"] for r in sim.stats()["requests"]}) == 1
        cancel = stats["cancellations"][0]
        assert 3 <= cancel["tokens_sent"] < 1000
        assert 0 <= cancel["observed_at"] - closed_at < 0.25
        assert cancel["protocol"] == protocol
        assert cancel["reason"] == ("stream_reset" if protocol == "h2" else "connection_closed")
        assert sim.stats()["streams_open"] == 0

    run_with_sim(test, ttft_ms=0, token_interval_ms=5)


# ------------------------------------------------------------------ concurrency and flow control


def test_twenty_concurrent_streams_on_one_h2_connection():
    n = 20

    async def one(pool, sim, i):
        status, _, raw = await post(pool, sim, chat(f"question {i}"))
        assert status == 200
        events = parse_sse(raw)
        assert events[-1] == "[DONE]" and len(token_text(events)) == 12
        return "".join(token_text(events))

    async def test(sim):
        async with make_pool("h2") as pool:
            t0 = time.monotonic()
            answers = await asyncio.gather(*(one(pool, sim, i) for i in range(n)))
            elapsed = time.monotonic() - t0
            assert len(pool.connections) == 1
        # One stream takes ~100 + 11*10 ms; twenty in sequence would take ~4.2 s.
        assert elapsed < 2.0
        assert len(set(answers)) == n
        stats = sim.stats()
        assert stats["calls"] == n and stats["streams_completed"] == n
        assert {r["protocol"] for r in stats["requests"]} == {"h2"}
        assert len({r["conn_id"] for r in stats["requests"]}) == 1

    run_with_sim(test, ttft_ms=100)


def test_h2_flow_control_large_streams():
    # Each stream is ~600 KB, far beyond the client's 64 KiB stream window, so
    # the server must wait for WINDOW_UPDATEs (h2 raises if it overruns a window).
    async def test(sim):
        async with make_pool("h2") as pool:
            results = await asyncio.gather(*(post(pool, sim, chat(f"big {i} #sim tokens=3000")) for i in range(3)))
        for status, _, raw in results:
            assert status == 200 and len(raw) > 65535 * 4
            events = parse_sse(raw)
            assert events[-1] == "[DONE]" and len(token_text(events)) == 3000

    run_with_sim(test, ttft_ms=0, token_interval_ms=0)


# ------------------------------------------------------------------ admin routes


def test_admin_routes():
    async def test(sim):
        assert await get_json(sim, "/healthz") == (200, {"ok": True})
        status, config = await get_json(sim, "/config")
        assert status == 200 and config == formats.DEFAULT_KNOBS

        status, config = await get_json(sim, "/config", "POST", b'{"tokens": 4, "ttft_ms": 0}')
        assert status == 200 and config["tokens"] == 4 and config["token_interval_ms"] == 10
        status, error = await get_json(sim, "/config", "POST", b'{"tokenz": 4}')
        assert status == 400 and "tokenz" in error["error"]["message"]

        async with make_pool("h2") as pool:
            _, _, raw = await post(pool, sim, chat("configured"))
            assert len(token_text(parse_sse(raw))) == 4
            status, _, raw = await post(pool, sim, chat("bad #sim nope=1"))
            assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
            status, _, raw = await post(pool, sim, b"{not json")
            assert status == 400

        status, stats = await get_json(sim, "/stats")
        assert status == 200 and stats["calls"] == 3
        assert [r["call_id"] for r in stats["requests"]] == [1, 2, 3]
        assert set(stats) >= {
            "calls",
            "streams_open",
            "streams_completed",
            "streams_cancelled",
            "cancellations",
            "requests",
        }
        status, stats = await get_json(sim, "/stats/reset", "POST")
        assert stats["calls"] == 0 and stats["requests"] == [] and stats["cancellations"] == []
        status, config = await get_json(sim, "/config/reset", "POST")
        assert config == formats.DEFAULT_KNOBS

        status, error = await get_json(sim, "/nope")
        assert status == 404 and "error" in error
        status, _ = await get_json(sim, CHAT)
        assert status == 405

    run_with_sim(test)


def test_stop_with_streams_open_leaves_nothing_behind():
    async def main():
        async with asyncio.timeout(TEST_TIMEOUT):
            await body()

    async def body():
        sim = SimulatedProvider()
        await sim.start()
        pool = make_pool("h2")
        resp = await pool.request("GET", sim.url + "/healthz")  # warm the connection
        assert resp.status == 200
        stalled = asyncio.create_task(pool.request("POST", sim.url + CHAT, content=chat("x #sim fail=stall")))
        await poll(lambda: sim.stats()["streams_open"] == 1)
        await sim.stop()
        with pytest.raises(httpcore.RemoteProtocolError):
            await stalled
        await pool.aclose()
        assert sim.stats()["cancellations"] == []  # shutdown is not a client cancellation
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", sim.port), timeout=1).close()

    asyncio.run(main())


# ------------------------------------------------------------------ as a process


@pytest.mark.integration  # starts a gateway or a process of its own
def test_subprocess_start_and_sigint():
    proc, port = start_subprocess()
    try:
        assert port > 0
        with httpcore.ConnectionPool(http2=True, http1=False) as pool:
            resp = pool.request("GET", f"http://127.0.0.1:{port}/healthz")
            assert (resp.status, json.loads(resp.content)) == (200, {"ok": True})
            resp = pool.request("POST", f"http://127.0.0.1:{port}{CHAT}", content=chat("hi #sim ttft_ms=0"))
            assert parse_sse(resp.content)[-1] == "[DONE]"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        stop_subprocess(proc)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
