"""Provider adapters (protocols/providers/*): fixture transcripts -> normalized events,
chunking independence, malformed and truncated streams, HTTP errors, request building."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running `pytest` without the project installed
    sys.path.insert(0, str(ROOT))

from protocols import events as ev  # noqa: E402
from protocols import sse  # noqa: E402
from protocols.providers import (  # noqa: E402
    ADAPTERS,
    anthropic,
    base,
    get_adapter,
    ollama,
    openai_chat,
    openai_responses,
    perplexity_agent,
    perplexity_sonar,
)

FIXTURES = ROOT / "tests" / "fixtures" / "providers"
MODULES = [openai_chat, openai_responses, anthropic, perplexity_agent, perplexity_sonar, ollama]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run(module, chunks) -> list[dict]:
    parser = module.Parser()
    out: list[dict] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out + parser.close()


def split_at(data: bytes, cuts) -> list[bytes]:
    points = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    return [data[a:b] for a, b in zip(points, points[1:])]


def first_value(name: str, key: str):
    """The first value of `key` in any JSON payload of a fixture (independent of the adapters)."""
    for line in raw(name).decode().splitlines():
        payload = line[len("data: ") :] if line.startswith("data: ") else line
        try:
            obj = json.loads(payload)
        except ValueError:
            continue
        stack = [obj]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if key in item:
                    return item[key]
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    raise KeyError(key)


def tool_meta(call_id: str, name: str, arguments: str) -> dict:
    return ev.meta(tool_calls=[{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}])


def tool_streamed(call_id: str, name: str, *fragments: str) -> list[dict]:
    """A call as it streams (its start, then each argument fragment), then the whole call."""
    start = ev.meta(tool_call_delta={"index": 0, "id": call_id, "name": name, "arguments": ""})
    pieces = [ev.meta(tool_call_delta={"index": 0, "arguments": f}) for f in fragments]
    return [start, *pieces, tool_meta(call_id, name, "".join(fragments))]


# --- fixture -> exact events ------------------------------------------------------------

CASES = {
    "openai_chat.sse": (
        openai_chat,
        [
            ev.meta(system_fingerprint="fp_eb9dce56a8"),
            ev.delta("Caf"),
            ev.delta("é au lait"),
            ev.delta(" — 日本"),
            ev.delta(" 🎉"),
            ev.usage(19, 10, 29),
            ev.finish("stop"),
        ],
    ),
    "openai_chat_tool_calls.sse": (
        openai_chat,
        [
            ev.meta(system_fingerprint="fp_eb9dce56a8"),
            *tool_streamed("call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", '{"', "location", '":"Paris, France"}'),
            ev.usage(82, 17, 99),
            ev.finish("tool_calls"),
        ],
    ),
    "openai_chat_error.sse": (
        openai_chat,
        [
            ev.meta(system_fingerprint="fp_eb9dce56a8"),
            ev.delta("Hello"),
            ev.error("upstream_5xx", "The server had an error while processing your request. Sorry about that!"),
        ],
    ),
    "openai_responses.sse": (
        openai_responses,
        [
            ev.meta(reasoning="Greeting the user warmly."),
            ev.delta("Hi"),
            ev.delta(" there"),
            ev.delta(" — ça va"),
            ev.delta("? ✨"),
            ev.usage(37, 11, 48),
            ev.finish("stop"),
        ],
    ),
    "openai_responses_tool_call.sse": (
        openai_responses,
        [
            *tool_streamed("call_unLAR8MvFNptuiZK6K6HCy5k", "get_current_weather", '{"location":', '"Boston, MA"}'),
            ev.usage(291, 23, 314),
            ev.finish("tool_calls"),
        ],
    ),
    "openai_responses_failed.sse": (
        openai_responses,
        [
            ev.error("upstream_5xx", "The model failed to generate a response."),
        ],
    ),
    "anthropic.sse": (
        anthropic,
        [
            ev.meta(reasoning="The user wants a greeting in French."),
            ev.delta("Bonjour à"),
            ev.delta(" tous ! 👋"),
            ev.usage(472, 41, 513),
            ev.finish("stop"),
        ],
    ),
    "anthropic_tool_use.sse": (
        anthropic,
        [
            ev.delta("Let me check the weather."),
            *tool_streamed("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", '{"location":', ' "San Francisco, CA"}'),
            ev.usage(472, 89, 561),
            ev.finish("tool_calls"),
        ],
    ),
    "anthropic_overloaded.sse": (
        anthropic,
        [
            ev.delta("Once upon"),
            ev.error("upstream_5xx", "Overloaded"),
        ],
    ),
    "perplexity_agent.sse": (
        perplexity_agent,
        [
            ev.meta(reasoning="I should look up current population figures for Tokyo."),
            ev.meta(reasoning="Searching the web.", search_queries=["Tokyo population 2025"]),
            ev.meta(search_results=first_value("perplexity_agent.sse", "results")),
            ev.meta(reasoning="Found an official source."),
            ev.delta("Tokyo (東京) has"),
            ev.delta(" about 14.2 million"),
            ev.delta(" residents [2]."),
            ev.usage(1523, 42, 1565),
            ev.finish("stop"),
        ],
    ),
    "perplexity_agent_untyped.sse": (
        perplexity_agent,
        [
            ev.delta("Hello! How can I help"),
            ev.delta(" you today?"),
            ev.usage(9, 10, 19),
            ev.finish("stop"),
        ],
    ),
    "perplexity_agent_failed.sse": (
        perplexity_agent,
        [
            ev.meta(reasoning="Planning the search."),
            ev.error("upstream_429", "Rate limit exceeded for preset pro-search. Please retry later."),
        ],
    ),
    "perplexity_sonar_full.sse": (
        perplexity_sonar,
        [
            ev.meta(
                citations=first_value("perplexity_sonar_full.sse", "citations"),
                search_results=first_value("perplexity_sonar_full.sse", "search_results"),
            ),
            ev.delta("Die"),
            ev.delta(" Hauptstadt"),
            ev.delta(" ist Berlin"),
            ev.delta(" [1]. Größe: 891 km² [2]."),
            ev.usage(7, 16, 23),
            ev.finish("stop"),
        ],
    ),
    "ollama.ndjson": (
        ollama,
        [
            ev.delta("Hola"),
            ev.delta(","),
            ev.delta(" ¿qué tal?"),
            ev.delta(" 🙂"),
            ev.usage(26, 4, 30),
            ev.finish("stop"),
        ],
    ),
    "ollama_error.ndjson": (
        ollama,
        [
            ev.delta("Érase"),
            ev.delta(" una vez"),
            ev.error("upstream_error", "an error was encountered while running the model: CUDA error: out of memory"),
        ],
    ),
}


def test_every_fixture_has_a_case():
    streams = {p.name for p in FIXTURES.iterdir() if p.suffix in (".sse", ".ndjson")}
    assert streams == set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_fixture_gives_exact_events(name):
    module, expected = CASES[name]
    assert run(module, [raw(name)]) == expected


@pytest.mark.parametrize("name", CASES)
def test_one_byte_chunks_give_the_same_events(name):
    module, expected = CASES[name]
    data = raw(name)
    assert run(module, [data[i : i + 1] for i in range(len(data))]) == expected


@pytest.mark.parametrize("name", CASES)
@PROPERTY
@given(data=st.data())
def test_split_anywhere_gives_the_same_events(name, data):
    module, expected = CASES[name]
    payload = raw(name)
    cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=30))
    assert run(module, split_at(payload, cuts)) == expected


@pytest.mark.parametrize("name", CASES)
@PROPERTY
@given(data=st.data())
def test_truncated_stream_ends_with_exactly_one_terminal_event(name, data):
    module, expected = CASES[name]
    payload = raw(name)
    cut = data.draw(st.integers(0, len(payload) - 1))
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=10))
    out = run(module, split_at(payload[:cut], cuts))
    terminal = [e for e in out if e["type"] in (ev.FINISH, ev.ERROR)]
    assert len(terminal) == 1 and out[-1] is terminal[0]
    if out[-1]["type"] == ev.ERROR and out[-1]["code"] == "upstream_truncated":
        assert out[:-1] == expected[: len(out) - 1]  # what came before is a prefix of the real stream
    else:
        assert out == expected  # the cut only lost bytes after the terminator


@pytest.mark.parametrize("name", CASES)
def test_nothing_after_the_terminal_event(name):
    module, expected = CASES[name]
    parser = module.Parser()
    assert parser.feed(raw(name)) + parser.close() == expected
    assert parser.feed(raw(name)) == []
    assert parser.close() == []


# --- malformed frames --------------------------------------------------------------------


def frames(name: str) -> list[bytes]:
    data = raw(name)
    sep = b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n" if data.startswith((b"data:", b"event:")) else b"\n"
    return [part + sep for part in data.split(sep) if part.strip()]


BAD = {
    openai_chat: (
        "openai_chat.sse",
        [
            b"data: {not json\n\n",
            b"data: [1, 2]\n\n",
            b'data: {"choices": "nope"}\n\n',
            b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n',
        ],
    ),
    openai_responses: (
        "openai_responses.sse",
        [
            b'data: {"type": \n\n',
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":7}\n\n',
        ],
    ),
    anthropic: (
        "anthropic.sse",
        [
            b"event: content_block_delta\ndata: {oops}\n\n",
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":42}}\n\n',
            b'event: message_delta\ndata: "just a string"\n\n',
        ],
    ),
    perplexity_agent: (
        "perplexity_agent.sse",
        [
            b'event: response.output_text.delta\ndata: {"delta": "x"\n\n',
            b'event: response.reasoning.search_results\ndata: {"results": "none"}\n\n',
        ],
    ),
    perplexity_sonar: (
        "perplexity_sonar_full.sse",
        [
            b"data: {]\r\n\r\n",
            b'data: {"citations": "x", "choices": []}\r\n\r\n',
            b'data: {"choices": [{"message": {"content": 1}}]}\r\n\r\n',
        ],
    ),
    ollama: (
        "ollama.ndjson",
        [b"{not json\n", b"[]\n", b'{"message": {"content": 7}, "done": false}\n', b'{"done": "yes"}\n'],
    ),
}


@pytest.mark.parametrize(
    "module,bad",
    [(m, b) for m, (_, bads) in BAD.items() for b in bads],
    ids=lambda x: getattr(x, "__name__", None) or x.decode(errors="replace")[:30],
)
@pytest.mark.parametrize("at", [0, 2])
def test_malformed_frame_gives_one_error_then_nothing(module, bad, at):
    parts = frames(BAD[module][0])
    before, after = b"".join(parts[:at]), b"".join(parts[at:])
    reference = module.Parser().feed(before)
    parser = module.Parser()
    assert parser.feed(before) == reference
    out = parser.feed(bad)
    assert len(out) == 1 and out[0]["type"] == ev.ERROR and out[0]["code"] == "upstream_malformed"
    assert parser.feed(after) == []
    assert parser.close() == []


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_feed_never_raises_on_garbage(module):
    parser = module.Parser()
    out = parser.feed(b"\x00\xff\xfe garbage \xc3\n\n{\n\n") + parser.feed(b"\xe2\x82") + parser.close()
    assert [e["type"] for e in out] == [ev.ERROR]


@PROPERTY
@given(data=st.binary(max_size=300), module=st.sampled_from(MODULES))
def test_arbitrary_bytes_never_raise_and_end_with_one_terminal(data, module):
    out = run(module, [data])
    assert [e["type"] for e in out].count(ev.ERROR) + [e["type"] for e in out].count(ev.FINISH) == 1
    assert out[-1]["type"] in (ev.ERROR, ev.FINISH)


# --- adapter-specific behaviour ---------------------------------------------------------


def sonar_chunk(delta: str | None, message: str | None, finish=None, **extra) -> bytes:
    choice: dict = {"index": 0, "finish_reason": finish}
    if delta is not None:
        choice["delta"] = {"role": "assistant", "content": delta}
    if message is not None:
        choice["message"] = {"role": "assistant", "content": message}
    return f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [choice], **extra})}\n\n".encode()


def test_sonar_never_duplicates_text_even_when_a_delta_repeats_everything():
    out = run(
        perplexity_sonar,
        [
            sonar_chunk("Hello", "Hello"),
            sonar_chunk(" world", "Hello world"),
            sonar_chunk("Hello world", "Hello world", finish="stop"),  # a last chunk repeating it all
            b"data: [DONE]\n\n",
        ],
    )
    assert out == [ev.delta("Hello"), ev.delta(" world"), ev.finish("stop")]


def test_sonar_uses_delta_when_message_is_absent_and_needs_no_done():
    out = run(
        perplexity_sonar, [sonar_chunk("a", None), sonar_chunk("b", None), sonar_chunk("", None, finish="length")]
    )
    assert out == [ev.delta("a"), ev.delta("b"), ev.finish("length")]


def test_sonar_meta_only_when_sources_first_appear_or_change():
    one, two = ["https://a.example"], ["https://a.example", "https://b.example"]
    out = run(
        perplexity_sonar,
        [
            sonar_chunk("x", "x"),
            sonar_chunk("y", "xy", citations=one),
            sonar_chunk("z", "xyz", citations=one),
            sonar_chunk("", "xyz", citations=two, finish="stop"),
        ],
    )
    assert out == [
        ev.delta("x"),
        ev.meta(citations=one),
        ev.delta("y"),
        ev.delta("z"),
        ev.meta(citations=two),
        ev.finish("stop"),
    ]


def test_sonar_without_a_finish_reason_is_truncated():
    out = run(perplexity_sonar, [sonar_chunk("a", "a")])
    assert out[0] == ev.delta("a") and out[1]["code"] == "upstream_truncated" and len(out) == 2


def test_openai_done_without_a_finish_reason_still_finishes_once():
    out = run(
        openai_chat,
        [
            b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n',
            b"data: [DONE]\n\n",
        ],
    )
    assert out == [ev.delta("x"), ev.finish("length")]
    assert run(openai_chat, [b"data: [DONE]\n\n"]) == [ev.finish("stop")]


def test_openai_choices_beyond_zero_carry_their_index():
    out = run(
        openai_chat,
        [
            b'data: {"choices":[{"index":1,"delta":{"content":"no"},"finish_reason":"length"},'
            b'{"index":0,"delta":{"content":"yes"}}]}\n\n',
            b"data: [DONE]\n\n",
        ],
    )
    assert out == [
        {**ev.delta("no"), "choice": 1},
        ev.delta("yes"),
        {**ev.meta(finish_reason="length"), "choice": 1},
        ev.finish("stop"),
    ]


def test_openai_logprobs_refusal_and_reasoning_reach_the_events():
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}], "refusal": None}
    chunk = {
        "system_fingerprint": "fp_1",
        "choices": [
            {"index": 0, "logprobs": logprobs, "delta": {"content": "Hi", "reasoning_content": "hm", "refusal": "no"}}
        ],
    }
    out = run(openai_chat, [b"data: " + json.dumps(chunk).encode() + b"\n\n", b"data: [DONE]\n\n"])
    assert out == [
        ev.meta(system_fingerprint="fp_1"),
        {**ev.delta("Hi"), "logprobs": logprobs},
        ev.meta(reasoning="hm"),
        ev.meta(refusal="no"),
        ev.finish("stop"),
    ]


@pytest.mark.parametrize(
    "reason,expected",
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "pause_turn"),
    ],
)
def test_anthropic_stop_reasons(reason, expected):
    stream = (
        f'event: message_delta\ndata: {{"type":"message_delta","delta":{{"stop_reason":"{reason}"}},"usage":{{"output_tokens":3}}}}\n\n'
        'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ).encode()
    assert run(anthropic, [stream]) == [ev.usage(None, 3, None), ev.finish(expected)]


def test_anthropic_usage_counts_cached_prompt_tokens_and_first_finish_wins():
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 3000,
                "output_tokens": 1,
            }
        },
    }
    stream = (
        f"event: message_start\ndata: {json.dumps(start)}\n\n"
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":7}}\n\n'
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":8}}\n\n'
        'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ).encode()
    assert run(anthropic, [stream]) == [ev.usage(3210, 8, 3218), ev.finish("length")]


def test_responses_incomplete_maps_to_length():
    stream = b'data: {"type":"response.incomplete","response":{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":5,"output_tokens":16,"total_tokens":21}}}\n\n'
    assert run(openai_responses, [stream]) == [ev.usage(5, 16, 21), ev.finish("length")]


def test_responses_error_event():
    stream = b'event: error\ndata: {"type":"error","code":"rate_limit_exceeded","message":"Slow down.","param":null,"sequence_number":3}\n\n'
    assert run(openai_responses, [stream]) == [ev.error("upstream_429", "Slow down.")]


def test_ollama_last_line_without_newline_is_read_at_close():
    data = raw("ollama.ndjson").rstrip(b"\n")
    assert run(ollama, [data]) == CASES["ollama.ndjson"][1]


def test_ollama_tool_calls():
    line = {
        "model": "llama3.2",
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Toronto"}}}],
        },
        "done": False,
    }
    last = {
        "model": "llama3.2",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 10,
        "eval_count": 5,
    }
    out = run(ollama, [(json.dumps(line) + "\n" + json.dumps(last) + "\n").encode()])
    assert out == [
        *tool_streamed("call_0", "get_weather", '{"city":"Toronto"}'),  # sent whole: one fragment
        ev.usage(10, 5, 15),
        ev.finish("tool_calls"),
    ]


def test_sse_comments_and_keepalives_are_ignored():
    stream = b": keepalive\n\n" + raw("openai_chat.sse").replace(b"\n\ndata:", b"\n\n: ping\n\ndata:", 2)
    assert run(openai_chat, [stream]) == CASES["openai_chat.sse"][1]


# --- HTTP errors ---------------------------------------------------------------------------

HTTP_ERRORS = json.loads((FIXTURES / "http_errors.json").read_text())
PROVIDER_MODULE = {"openai": openai_chat, "anthropic": anthropic, "perplexity": perplexity_agent, "ollama": ollama}
NOW = 1_792_000_000.0


def http_error(provider: str, status: str, headers=None):
    case = HTTP_ERRORS[provider][status]
    hdrs = [(k.encode(), v.encode()) for k, v in (headers if headers is not None else case["headers"])]
    return PROVIDER_MODULE[provider].error_from_response(int(status), hdrs, case["body"].encode(), now=NOW)


@pytest.mark.parametrize(
    "provider,status,code,message,retry",
    [
        (
            "openai",
            "401",
            "upstream_auth",
            "Incorrect API key provided: sk-proj-****abcd. You can find your API key at https://platform.openai.com/account/api-keys.",
            None,
        ),
        (
            "openai",
            "429",
            "upstream_429",
            "Rate limit reached for gpt-4o in organization org-abc123 on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.",
            20.0,
        ),
        (
            "openai",
            "500",
            "upstream_5xx",
            "The server had an error while processing your request. Sorry about that!",
            None,
        ),
        ("anthropic", "401", "upstream_auth", "invalid x-api-key", None),
        (
            "anthropic",
            "429",
            "upstream_429",
            "This request would exceed your account's rate limit. Please try again later.",
            17.0,
        ),
        ("anthropic", "500", "upstream_5xx", "Internal server error", None),
        ("anthropic", "529", "upstream_5xx", "Overloaded", None),
        ("perplexity", "401", "upstream_auth", "401 Unauthorized", None),
        ("perplexity", "429", "upstream_429", "Rate limit exceeded. Please try again later.", None),
        ("perplexity", "500", "upstream_5xx", "Internal server error", None),
        ("ollama", "401", "upstream_auth", "unauthorized", None),
        ("ollama", "404", "upstream_4xx", 'model "llama9" not found, try pulling it first', None),
        ("ollama", "429", "upstream_429", "too many requests, please retry later", 3.0),
        ("ollama", "500", "upstream_5xx", "llama runner process has terminated: exit status 2", None),
    ],
)
def test_error_from_response(provider, status, code, message, retry):
    event = http_error(provider, status)
    assert event["type"] == ev.ERROR and event["code"] == code and event["message"] == message
    assert event["status"] == int(status)
    if retry is not None:
        assert event["retry_after_s"] == retry


def test_retry_after_http_date():
    when = format_datetime(datetime.fromtimestamp(NOW + 42, tz=UTC), usegmt=True)
    event = http_error("perplexity", "429", headers=[["Retry-After", when]])
    assert event["retry_after_s"] == pytest.approx(42.0)
    past = http_error("perplexity", "429", headers=[["retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"]])
    assert past["retry_after_s"] == 0.0


def test_retry_after_variants():
    body = b"{}"
    assert (
        base.error_from_response(429, [(b"retry-after-ms", b"1500"), (b"retry-after", b"9")], body)["retry_after_s"]
        == 1.5
    )
    assert base.error_from_response(429, [(b"Retry-After", b"0.25")], body)["retry_after_s"] == 0.25
    assert "retry_after_s" not in base.error_from_response(429, [(b"retry-after", b"soon")], body)
    assert "retry_after_s" not in base.error_from_response(429, [], body)
    assert "retry_after_s" not in base.error_from_response(400, [(b"retry-after", b"5")], body)
    assert base.error_from_response(503, [(b"retry-after", b"5")], b"")["retry_after_s"] == 5.0


def test_error_message_fallbacks():
    assert base.error_from_response(502, [], b"<html>Bad Gateway</html>")["message"] == "502 Bad Gateway"
    assert base.error_from_response(418, [], b'{"detail": [{"msg": "field required"}]}')["message"] == "field required"
    assert base.error_from_response(599, [], b"")["message"] == "HTTP 599"
    assert base.error_from_response(400, [], b'{"message": "' + b"x" * 5000 + b'"}')["message"].endswith("…")


# --- requests --------------------------------------------------------------------------------

KEY = "sk-test-SECRET-0123456789"
BODY = {
    "system": "Be brief.",
    "messages": [
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "user", "content": "Thanks — and tomorrow?"},
    ],
    "temperature": 0.2,
    "max_tokens": 256,
    "top_p": 0.9,
    "stop": ["\n\n"],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "tool_choice": "auto",
}
# What the Agent API has no counterpart for (refused: test_cross_format_refusals).
AGENT_BODY = {k: v for k, v in BODY.items() if k not in ("temperature", "top_p", "stop", "tool_choice")}
RESPONSES_BODY = {k: v for k, v in BODY.items() if k != "stop"}
MODELS = {
    openai_chat: "gpt-4o",
    openai_responses: "gpt-4.1",
    anthropic: "claude-sonnet-4-5",
    perplexity_agent: "openai/gpt-5-mini",
    perplexity_sonar: "sonar",
    ollama: "llama3.2",
}


def build(module, api_key=KEY, body=None, base_url=None, model=None):
    body = body or {perplexity_agent: AGENT_BODY, openai_responses: RESPONSES_BODY}.get(module, BODY)
    method, url, headers, data = module.build_request(
        base_url=base_url or module.DEFAULT_BASE_URL, api_key=api_key, model=model or MODELS[module], body=body
    )
    return method, url, headers, data, json.loads(data)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_build_request_basics_and_key_only_in_the_auth_header(module):
    method, url, headers, data, payload = build(module)
    assert method == "POST" and url == module.DEFAULT_BASE_URL + module.PATH
    assert payload["stream"] is True
    assert all(isinstance(k, bytes) and isinstance(v, bytes) and k == k.lower() for k, v in headers)
    assert (b"content-type", b"application/json") in headers
    assert KEY not in url and KEY.encode() not in data
    carrying = [k for k, v in headers if KEY.encode() in v]
    assert carrying == ([b"x-api-key"] if module is anthropic else [b"authorization"])
    if module is not anthropic:
        assert (b"authorization", b"Bearer " + KEY.encode()) in headers


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_build_request_without_key_has_no_auth_header(module):
    _, _, headers, _, _ = build(module, api_key=None)
    assert not [k for k, _ in headers if k in (b"authorization", b"x-api-key")]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("suffix", ["/", "/v1", "/v1/"])
def test_build_request_tolerates_base_url_forms(module, suffix):
    _, url, _, _, _ = build(module, base_url=module.DEFAULT_BASE_URL + suffix)
    expected = (
        module.DEFAULT_BASE_URL
        + ("/v1" if suffix.startswith("/v1") and not module.PATH.startswith("/v1/") else "")
        + module.PATH
    )
    assert url == expected


def test_build_request_rejects_header_injection():
    with pytest.raises(ValueError):
        openai_chat.build_request(base_url=openai_chat.DEFAULT_BASE_URL, api_key="k\r\nx-evil: 1", model="m", body=BODY)


def test_openai_chat_request():
    _, _, headers, _, p = build(openai_chat)
    assert (b"accept", b"text/event-stream") in headers
    assert p["stream_options"] == {"include_usage": True}
    assert p["messages"][0] == {"role": "system", "content": "Be brief."} and p["messages"][1]["role"] == "system"
    assert p["max_tokens"] == 256 and p["temperature"] == 0.2 and p["stop"] == ["\n\n"]
    assert p["tools"] == BODY["tools"] and p["tool_choice"] == "auto" and p["model"] == "gpt-4o"


def test_anthropic_request():
    _, _, headers, _, p = build(anthropic)
    assert (b"anthropic-version", b"2023-06-01") in headers and (b"x-api-key", KEY.encode()) in headers
    assert p["system"] == "Be brief.\n\nAnswer in English."
    assert [m["role"] for m in p["messages"]] == ["user", "assistant", "user"]
    assert p["max_tokens"] == 256 and p["stop_sequences"] == ["\n\n"]
    assert p["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather by city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert p["tool_choice"] == {"type": "auto"}
    _, _, _, _, minimal = build(anthropic, body={"messages": [{"role": "user", "content": "hi"}]})
    assert minimal["max_tokens"] == anthropic.DEFAULT_MAX_TOKENS == 1024 and "system" not in minimal


def test_openai_responses_request():
    _, _, _, _, p = build(openai_responses)
    assert p["instructions"] == "Be brief.\n\nAnswer in English."
    assert p["input"][0] == {"role": "user", "content": "Weather in Paris?"} and len(p["input"]) == 3
    assert p["max_output_tokens"] == 256 and "stop" not in p
    assert p["tools"][0]["type"] == "function" and p["tools"][0]["name"] == "get_weather"


def test_perplexity_agent_request():
    _, _, _, _, p = build(perplexity_agent)
    assert p["model"] == "openai/gpt-5-mini" and "preset" not in p
    assert p["instructions"] == "Be brief.\n\nAnswer in English." and p["max_output_tokens"] == 256
    assert p["input"][0] == {"type": "message", "role": "user", "content": "Weather in Paris?"}
    _, _, _, _, q = build(
        perplexity_agent, model="pro-search", body={"messages": [{"role": "user", "content": "Tokyo population?"}]}
    )
    assert q == {"preset": "pro-search", "input": "Tokyo population?", "stream": True}


def test_perplexity_sonar_request():
    _, url, _, _, p = build(perplexity_sonar)
    assert url == "https://api.perplexity.ai/chat/completions"
    assert p["max_tokens"] == 256 and p["tools"] == BODY["tools"] and "stream_options" not in p


def test_ollama_request():
    _, url, headers, _, p = build(ollama, api_key=None)
    assert url == "http://127.0.0.1:11434/api/chat"
    assert (b"accept", b"application/x-ndjson") in headers
    assert p["options"] == {"temperature": 0.2, "top_p": 0.9, "num_predict": 256, "stop": ["\n\n"]}
    assert p["messages"][0] == {"role": "system", "content": "Be brief."} and p["tools"] == BODY["tools"]
    _, _, _, _, parts = build(
        ollama, body={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    )
    assert parts["messages"] == [{"role": "user", "content": "hi"}] and "options" not in parts


# --- registry ------------------------------------------------------------------------------


def test_registry():
    assert ADAPTERS == {
        "openai": openai_chat,
        "openai_responses": openai_responses,
        "anthropic": anthropic,
        "perplexity": perplexity_agent,
        "perplexity_sonar": perplexity_sonar,
        "ollama": ollama,
        "simulated": openai_chat,
    }
    assert get_adapter("perplexity") is perplexity_agent
    with pytest.raises(KeyError):
        get_adapter("nope")
    for module in set(ADAPTERS.values()):
        assert module.__doc__ and "http" in module.__doc__
        for name in ("DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "error_from_response"):
            assert hasattr(module, name)


# --- SSE line splitting (protocols/sse.py, rewritten with bytes.find) -----------------------


def _split_line_reference(buffer: bytes):
    """The original byte-by-byte implementation, kept to pin the behaviour."""
    for i, byte in enumerate(buffer):
        if byte == 0x0A:
            return buffer[:i], True, buffer[i + 1 :]
        if byte == 0x0D:
            if i + 1 == len(buffer):
                return buffer, False, b""
            skip = 2 if buffer[i + 1] == 0x0A else 1
            return buffer[:i], True, buffer[i + skip :]
    return buffer, False, b""


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"data: x", b":", b" ", b"\xc3\xa9"]), max_size=12).map(
        b"".join
    )
)
def test_split_line_matches_the_original(buffer):
    assert sse._split_line(buffer) == _split_line_reference(buffer)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"\r", b"\n", b"\r\n", b"data: a", b"data: \xc3\xa9", b"event: e", b": c", b"id: 1"]),
        max_size=20,
    ).map(b"".join),
    st.data(),
)
def test_sse_parser_is_chunking_independent(stream, data):
    whole = sse.SSEParser().feed(stream)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    parser = sse.SSEParser()
    pieces = [e for chunk in split_at(stream, cuts) for e in parser.feed(chunk)]
    assert pieces == whole


def test_count_tokens_adapter_reads_one_json_answer():
    from protocols.providers import adapter_for, anthropic_count_tokens

    body = {"count_tokens": {"messages": [{"role": "user", "content": "hi"}], "model": "ignored"}}
    assert adapter_for("anthropic", body) is anthropic_count_tokens and anthropic_count_tokens.check(body) is None
    method, url, headers, payload = anthropic_count_tokens.build_request(
        base_url="https://api.anthropic.com", api_key="k", model="claude-x", body=body
    )
    assert url == "https://api.anthropic.com/v1/messages/count_tokens" and (b"x-api-key", b"k") in headers
    assert json.loads(payload) == {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
    parser = anthropic_count_tokens.Parser()
    out = parser.feed(b'{"input_tokens": ') + parser.feed(b"14}") + parser.close()
    assert out == [ev.meta(count_tokens={"input_tokens": 14}), ev.usage(14, 0), ev.finish("stop")]
    parser = anthropic_count_tokens.Parser()
    bad = parser.feed(b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}') + parser.close()
    assert bad == [ev.error("upstream_5xx", "busy")]
    parser = anthropic_count_tokens.Parser()
    assert [e["code"] for e in parser.feed(b'{"tokens": 1}') + parser.close()] == ["upstream_malformed"]


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([b"data: " + b"x" * 65536] * 130, id="one-endless-line"),
        pytest.param(
            [b'data: {"choices": [{"delta": {"content": "' + b"y" * 65000 + b'"}}]}\n'] * 130, id="no-blank-line"
        ),
    ],
)
def test_an_sse_event_past_the_frame_limit_is_malformed_and_not_held(pieces):
    """8 MB of one line, or of data lines that no blank line ends (events separated by a
    single newline): an upstream_malformed error once past MAX_FRAME_BYTES, not a Pool
    holding the provider's whole output (it held the data lines without bound)."""
    parser = openai_chat.Parser()
    out: list[dict] = []
    for piece in pieces:
        out += parser.feed(piece)
        if out:
            break
    out += parser.close()
    assert [e["type"] for e in out] == [ev.ERROR] and out[0]["code"] == "upstream_malformed", out
    assert "longer than" in out[0]["message"]
    assert parser._sse.pending_size <= base.MAX_FRAME_BYTES + 65536 + 64


def test_keepalives_are_no_frames_and_a_ping_event_is_one():
    """What the Pool's read timeout counts as progress (actors/upstream.py): a frame with data,
    never an SSE comment or an empty NDJSON line."""
    chat = openai_chat.Parser()
    chat.feed(b": keepalive\n\n: OPENROUTER PROCESSING\n\n\n")
    assert chat.frames == 0
    chat.feed(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
    assert chat.frames == 1
    claude = anthropic.Parser()
    claude.feed(b'event: ping\ndata: {"type": "ping"}\n\n')
    assert claude.frames == 1
    lines = ollama.Parser()
    lines.feed(b"\n\n\n")
    assert lines.frames == 0
    # A long frame still arriving is progress too: what it holds so far grows.
    chat.feed(b'data: {"choices": [{"delta": {"content": "' + b"x" * 1000)
    assert chat.pending_size > 1000 and chat.frames == 1
    lines.feed(b'{"message": {"content": "' + b"y" * 500)
    assert lines.pending_size > 500 and lines.frames == 0
