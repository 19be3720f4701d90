"""The simulated provider speaks every provider's wire format (sim/formats.py ROUTES).

For each provider adapter (protocols/providers) the request is the one the adapter builds,
sent to a real in-process SimulatedProvider over HTTP/2 (prior knowledge) and HTTP/1.1;
the bytes are fed to the same adapter's Parser as they arrive. The sim must be understood
exactly like the real API: the sim's tokens as deltas, one usage, one finish, and every
error form (HTTP 429/500 bodies, in-band error frames, resets, truncation) mapped to the
right code. Frame shapes are also checked against the recorded transcripts in
tests/fixtures/providers, so the sim cannot drift into a format only our parsers accept.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpcore
import pytest

from protocols import events as ev
from protocols.providers import get_adapter
from protocols.sse import SSEParser
from sim import formats
from sim.provider import SimulatedProvider

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "providers"
PROVIDERS = ["openai", "openai_responses", "anthropic", "perplexity", "perplexity_sonar", "ollama"]
PROTOCOLS = ["h2", "http/1.1"]
KEY = "sk-sim-formats-secret-0123456789"
TIMEOUT = 20.0

# Which credential header each API uses, as recorded (name and scheme only) in /stats.
AUTH = {"anthropic": ["x-api-key"]}
# Fixtures holding the frames of a provider's normal stream and its in-band error.
STREAM_FIXTURES = {
    "openai": ["openai_chat.sse", "openai_chat_error.sse"],
    "openai_responses": ["openai_responses.sse", "openai_responses_failed.sse"],
    "anthropic": ["anthropic.sse", "anthropic_overloaded.sse"],
    "perplexity": ["perplexity_agent.sse", "perplexity_agent_failed.sse"],
    "perplexity_sonar": ["perplexity_sonar_full.sse"],
    "ollama": ["ollama.ndjson", "ollama_error.ndjson"],
}
HTTP_ERROR_FIXTURE = {
    "openai": "openai",
    "openai_responses": "openai",
    "anthropic": "anthropic",
    "perplexity": "perplexity",
    "perplexity_sonar": "perplexity",
    "ollama": "ollama",
}
IN_BAND_CODE = {"ollama": "upstream_error"}  # Ollama's error line says nothing about its kind


def conversation(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def expected_tokens(text: str, n: int) -> list[str]:
    """Every format answers from the same normalized conversation, system text first."""
    return formats.make_tokens(conversation(text), n)


def run(test):
    async def main():
        async with asyncio.timeout(TIMEOUT), SimulatedProvider() as sim:
            sim.config.update(ttft_ms=0, token_interval_ms=0)
            await test(sim)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, f"tasks still running after stop(): {leftover}"

    asyncio.run(main())


def pool_for(protocol: str) -> httpcore.AsyncConnectionPool:
    return httpcore.AsyncConnectionPool(http1=protocol != "h2", http2=protocol == "h2")


async def call(sim, provider: str, protocol: str, text: str, body_extra: dict | None = None):
    """Send the adapter's own request; return (status, headers, events, raw bytes, transport error)."""
    adapter = get_adapter(provider)
    method, url, headers, body = adapter.build_request(
        base_url=sim.url, api_key=KEY, model="sim-model", body={"messages": conversation(text), **(body_extra or {})}
    )
    parser, events, raw, broken = adapter.Parser(), [], b"", None
    async with pool_for(protocol) as pool:
        try:
            async with pool.stream(method, url, headers=headers, content=body) as response:
                assert response.extensions["http_version"] == (b"HTTP/2" if protocol == "h2" else b"HTTP/1.1")
                status, resp_headers = response.status, response.headers
                async for chunk in response.aiter_stream():
                    raw += chunk
                    if status == 200:
                        events += parser.feed(chunk)
        except httpcore.RemoteProtocolError as exc:
            broken = exc
    if status == 200:
        events += parser.close()
    else:
        events = [adapter.error_from_response(status, resp_headers, raw)]
    return status, {k.decode().lower(): v.decode() for k, v in resp_headers}, events, raw, broken


def deltas(events) -> list[str]:
    return [e["delta"] for e in events if e["type"] == ev.DELTA]


def terminal(events) -> list[dict]:
    return [e for e in events if e["type"] in (ev.FINISH, ev.ERROR)]


# --- a whole answer, in every format, over both protocols ------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_parses_to_the_sims_tokens(provider, protocol):
    text = f"hello {provider} #sim tokens=6"

    async def test(sim):
        status, headers, events, _, broken = await call(sim, provider, protocol, text)
        assert status == 200 and broken is None
        assert headers["content-type"] == formats.ROUTES[get_adapter(provider).PATH].stream_content_type
        assert deltas(events) == expected_tokens(text, 6)
        assert terminal(events) == [ev.finish("stop")] and events[-1] == ev.finish("stop")
        usage = [e["usage"] for e in events if e["type"] == ev.USAGE]
        assert len(usage) == 1 and usage[0]["completion_tokens"] == 6 and usage[0]["prompt_tokens"] > 0
        if provider in ("perplexity", "perplexity_sonar"):  # search-grounded: sources arrive as meta
            assert any(e["type"] == ev.META and e.get("search_results") for e in events)

        record = sim.stats()["requests"][-1]
        assert record["path"] == get_adapter(provider).PATH and record["protocol"] == protocol
        assert record["outcome"] == "completed" and record["tokens_sent"] == 6
        assert record["auth"] == AUTH.get(provider, ["authorization: Bearer"])
        assert KEY not in json.dumps(sim.stats())  # names only, never the credential

    run(test)


def test_the_same_prompt_gets_the_same_answer_in_every_format():
    async def test(sim):
        answers = set()
        for provider in PROVIDERS:
            _, _, events, _, _ = await call(sim, provider, "h2", "same question #sim tokens=5")
            answers.add("".join(deltas(events)))
        assert answers == {"".join(expected_tokens("same question #sim tokens=5", 5))}

    run(test)


def test_ollama_streams_when_stream_is_not_given():
    async def test(sim):
        async with pool_for("http/1.1") as pool:
            body = {"model": "llama", "messages": [{"role": "user", "content": "hi #sim tokens=3"}]}
            response = await pool.request("POST", sim.url + "/api/chat", content=json.dumps(body).encode())
        assert response.status == 200
        lines = [json.loads(line) for line in response.content.decode().splitlines()]
        assert [line["done"] for line in lines] == [False, False, False, True]
        assert lines[-1]["eval_count"] == 3

    run(test)


def test_a_tool_choice_of_an_odd_shape_is_no_sim_failure():
    """Probed through the gateway: a `tool_choice` whose `function` is not an object (the
    edge passes it on as sent) made the sim answer 500 "simulated provider bug"."""

    async def test(sim):
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        async with pool_for("h2") as pool:
            for function in (True, "f", [1], None):
                body = {
                    "model": "m",
                    "messages": [{"role": "user", "content": "hi #sim tokens=2"}],
                    "tools": tools,
                    "tool_choice": {"type": "function", "function": function},
                    "stream": True,
                }
                response = await pool.request(
                    "POST", sim.url + "/v1/chat/completions", content=json.dumps(body).encode()
                )
                assert response.status == 200, (function, response.content[:200])

    run(test)


# Where each API puts the text of a non-streamed answer.
COMPLETE_TEXT = {
    "openai": lambda o: o["choices"][0]["message"]["content"],
    "openai_responses": lambda o: o["output"][-1]["content"][0]["text"],
    "anthropic": lambda o: o["content"][0]["text"],
    "perplexity": lambda o: o["output"][-1]["content"][0]["text"],
    "perplexity_sonar": lambda o: o["choices"][0]["message"]["content"],
    "ollama": lambda o: o["message"]["content"],
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_non_streamed_answer_has_the_same_text(provider):
    text = f"whole answer {provider} #sim tokens=4"

    async def test(sim):
        adapter = get_adapter(provider)
        method, url, headers, body = adapter.build_request(
            base_url=sim.url, api_key=KEY, model="m", body={"messages": conversation(text)}
        )
        payload = {**json.loads(body), "stream": False}
        async with pool_for("h2") as pool:
            response = await pool.request(method, url, headers=headers, content=json.dumps(payload).encode())
        assert response.status == 200
        assert COMPLETE_TEXT[provider](json.loads(response.content)) == "".join(expected_tokens(text, 4))

    run(test)


# --- every error form ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_http_errors_map_to_their_codes(provider, protocol):
    async def test(sim):
        status, headers, events, raw, _ = await call(sim, provider, protocol, "x #sim fail=429 retry_after_s=3")
        assert status == 429 and headers["retry-after"] == "3"
        assert events[0]["code"] == "upstream_429" and events[0]["retry_after_s"] == 3.0
        assert "simulated" in events[0]["message"]  # the API's own message was found in its error body
        assert_error_body_shape(provider, 429, raw)

        status, _, events, raw, _ = await call(sim, provider, protocol, "x #sim fail=500")
        assert status == 500 and events[0]["code"] == "upstream_5xx"
        assert_error_body_shape(provider, 500, raw)

    run(test)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_in_band_error_after_some_tokens(provider, protocol):
    text = "x #sim fail=error_mid fail_after_tokens=2 tokens=6"

    async def test(sim):
        status, _, events, _, broken = await call(sim, provider, protocol, text)
        assert status == 200 and broken is None  # the response itself ends cleanly
        assert deltas(events) == expected_tokens(text, 6)[:2]
        assert terminal(events) == [events[-1]] and events[-1]["type"] == ev.ERROR
        assert events[-1]["code"] == IN_BAND_CODE.get(provider, "upstream_5xx")
        assert sim.stats()["requests"][-1]["outcome"] == "completed"

    run(test)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_reset_mid_stream_and_truncation(provider, protocol):
    async def test(sim):
        text = "x #sim fail=reset_mid fail_after_tokens=3 tokens=8"
        status, _, events, _, broken = await call(sim, provider, protocol, text)
        assert status == 200 and isinstance(broken, httpcore.RemoteProtocolError)
        assert deltas(events) == expected_tokens(text, 8)[:3]
        assert terminal(events) == [events[-1]] and events[-1]["code"] == "upstream_truncated"

        text = "x #sim fail=truncate tokens=4"
        status, _, events, _, broken = await call(sim, provider, protocol, text)
        assert status == 200 and broken is None
        assert deltas(events) == expected_tokens(text, 4)
        assert terminal(events) == [events[-1]] and events[-1]["code"] == "upstream_truncated"
        stats = sim.stats()
        assert stats["streams_aborted"] == 1 and stats["streams_completed"] == 1

    run(test)


def test_error_mid_is_a_known_knob():
    assert formats.parse_directive("#sim fail=error_mid") == {"fail": "error_mid"}


def test_a_bad_directive_is_a_400_in_the_apis_own_shape():
    async def test(sim):
        for provider in PROVIDERS:
            status, _, events, raw, _ = await call(sim, provider, "h2", "x #sim tokenz=1")
            assert status == 400 and events[0]["code"] == "upstream_4xx" and "tokenz" in events[0]["message"]

    run(test)


# --- the frames look like the recorded transcripts -------------------------------------------


def frames(provider: str, raw: bytes) -> list[tuple[str, dict]]:
    """(event name or JSON type, JSON object) for every frame of an SSE or NDJSON body."""
    if provider == "ollama":
        return [("line" if "error" not in o else "error", o) for o in map(json.loads, raw.decode().splitlines())]
    out = []
    for item in SSEParser().feed(raw):
        if item.data.strip() == "[DONE]":
            continue
        obj = json.loads(item.data)
        out.append(("error" if "error" in obj and item.event == "message" else item.event, obj))
    return out


def key_shapes(provider: str, raw: bytes) -> dict[str, set]:
    shapes: dict[str, set] = {}
    for name, obj in frames(provider, raw):
        shapes.setdefault(name, set()).update(obj)
    return shapes


@pytest.mark.parametrize("provider", PROVIDERS)
def test_frames_match_the_recorded_transcripts(provider):
    """Every event the sim sends exists in the real transcripts, with no field they lack."""
    recorded: dict[str, set] = {}
    for name in STREAM_FIXTURES[provider]:
        for kind, keys in key_shapes(provider, (FIXTURES / name).read_bytes()).items():
            recorded.setdefault(kind, set()).update(keys)

    async def test(sim):
        seen: dict[str, set] = {}
        for text in ("shape #sim tokens=3", "shape #sim tokens=3 fail=error_mid fail_after_tokens=1"):
            _, _, _, raw, _ = await call(sim, provider, "h2", text)
            for kind, keys in key_shapes(provider, raw).items():
                seen.setdefault(kind, set()).update(keys)
        if provider == "perplexity_sonar":
            seen.pop("error")  # no recorded Sonar error stream; its shape is OpenAI's
        unknown = set(seen) - set(recorded)
        assert not unknown, f"events the real API was not recorded sending: {unknown}"
        for kind, keys in seen.items():
            assert keys <= recorded[kind], f"{kind}: fields not in the transcripts: {keys - recorded[kind]}"

    run(test)


def assert_error_body_shape(provider: str, status: int, raw: bytes) -> None:
    recorded = json.loads(
        json.loads((FIXTURES / "http_errors.json").read_text())[HTTP_ERROR_FIXTURE[provider]][str(status)]["body"]
    )
    body = json.loads(raw)
    assert set(body) <= set(recorded)
    if isinstance(body.get("error"), dict):
        assert set(body["error"]) <= set(recorded["error"])


# --- broken bytes: every adapter ends with one clear error, never a raise -----------------------


BROKEN = {"malformed": "upstream_malformed", "cut_utf8": "upstream_truncated"}


@pytest.mark.parametrize("fault", sorted(BROKEN))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_broken_bytes_after_three_tokens_end_in_one_error(provider, fault):
    """fail=malformed: garbage and a frame that is not JSON; fail=cut_utf8: the body stops
    inside a two-byte character. Three whole tokens, then exactly one terminal error."""
    text = f"broken {provider} #sim tokens=6 fail={fault} fail_after_tokens=3"

    async def test(sim):
        status, _, events, raw, broken = await call(sim, provider, "h2", text)
        assert status == 200 and broken is None  # a clean end of the response
        if fault == "cut_utf8":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")  # the sim did cut a character
        # Sonar's chunks repeat the text so far: the fourth chunk's text never arrives whole.
        assert deltas(events) == expected_tokens(text, 3)
        assert terminal(events) == [events[-1]] and events[-1]["code"] == BROKEN[fault], events[-2:]
        assert sim.stats()["requests"][-1]["fail"] == fault

    run(test)


def test_stall_first_sends_nothing_until_the_client_leaves():
    async def test(sim):
        adapter = get_adapter("openai")
        method, url, headers, body = adapter.build_request(
            base_url=sim.url, api_key=KEY, model="m", body={"messages": conversation("hi #sim fail=stall_first")}
        )
        async with pool_for("h2") as pool:
            with pytest.raises(httpcore.ReadTimeout):
                await pool.request(method, url, headers=headers, content=body, extensions={"timeout": {"read": 0.3}})
        record = sim.stats()["requests"][-1]
        assert record["fail"] == "stall_first" and record["status"] is None and record["first_byte_at"] is None

    run(test)


def test_pings_only_sends_the_formats_own_ping_a_frame_the_parser_counts_but_no_event():
    """fail=pings_only: Anthropic's `event: ping` is a frame (the read timeout's keepalive
    rule does not catch it, only UPSTREAM_MAX_DURATION_S does); formats without a ping of
    their own send keepalive_only's bytes, which are no frame."""
    anthropic = get_adapter("anthropic").Parser()
    assert anthropic.feed(formats.ping_frame(formats.anthropic_messages) * 3) == [] and anthropic.frames == 3
    openai = get_adapter("openai").Parser()
    assert formats.ping_frame(formats.openai_chat) == formats.keepalive_frame(formats.openai_chat)
    assert openai.feed(formats.ping_frame(formats.openai_chat)) == [] and openai.frames == 0
    assert formats.validate_knobs({"fail": "pings_only"}) == {"fail": "pings_only"}
