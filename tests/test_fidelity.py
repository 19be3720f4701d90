"""Request fidelity, adapter by adapter (docs/providers.md "Fidelity"): a same-format
adapter forwards the client's body unchanged but for the fields sluice owns; a
cross-format adapter maps what has a counterpart and refuses the rest by name; the
coalescing key covers exactly what goes upstream; the edge keeps OpenAI's message shapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.chat_request import OPENAI_TYPES, OWNED, RequestError, parse_chat
from edge.openai_compat import ChunkRenderer, Completion
from edge.responses_compat import Response
from protocols import events as ev
from protocols.keys import coalescing_key
from protocols.providers import anthropic, ollama, openai_chat, openai_responses, perplexity_agent, perplexity_sonar

pytestmark = pytest.mark.unit

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TOOL_LOOP = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, clear"},
]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def payload(module, body, model="m"):
    return json.loads(module.build_request(base_url="http://x", api_key=None, model=model, body=body)[3])


# --- the edge keeps the shapes ---------------------------------------------------------------


def test_openai_message_shapes_survive_validation():
    messages = [
        {"role": "developer", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]},
        *TOOL_LOOP,
    ]
    chat = parse_chat({"model": "x", "stream": True, "messages": messages, "seed": 7, "user": "u1"})
    assert chat.body == {"messages": messages, "seed": 7, "user": "u1"}


@pytest.mark.parametrize(
    "message,where",
    [
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "assistant", "content": None}, "content"),
        ({"role": "user", "content": [{"type": "video"}]}, "content[0].type"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, "tool_calls[0]"),
        ({"role": "user", "content": "x", "name": 3}, "name"),
    ],
)
def test_malformed_openai_shapes_are_422_naming_the_place(message, where):
    with pytest.raises(RequestError) as info:
        parse_chat({"messages": [message]})
    assert info.value.status == 422 and f"messages[0].{where}" in info.value.message


# --- same format: forwarded as it came -------------------------------------------------------

EXTRA_KEYS = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    lambda k: k not in OWNED and k not in ("messages", "system", *VALIDATED)
)
VALIDATED = ("temperature", "top_p", "max_tokens", "stop", "n", *OPENAI_TYPES)  # the edge checks their values (422)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(extra=st.dictionaries(EXTRA_KEYS, JSON_VALUES, max_size=8))
@pytest.mark.parametrize("module", [openai_chat, perplexity_sonar], ids=lambda m: m.__name__)
def test_a_same_format_body_reaches_upstream_unchanged_but_for_owned_fields(module, extra):
    body = {"messages": TOOL_LOOP, **extra}
    sent = payload(module, parse_chat({"model": "x", "stream": False, **body}).body, model="upstream-model")
    owned = {"model": "upstream-model", "stream": True}
    assert {k: sent[k] for k in owned} == owned
    rest = {k: v for k, v in sent.items() if k not in ("model", "stream", "stream_options")}
    # byte for byte, in the client's key order
    assert json.dumps(rest, separators=(",", ":")) == json.dumps(body, separators=(",", ":"))
    assert openai_chat.check(body) is None


def test_openai_sends_every_parameter_the_issue_names():
    params = {
        "response_format": {"type": "json_object"},
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "parallel_tool_calls": False,
        "user": "u1",
        "metadata": {"a": "b"},
        "presence_penalty": 0.5,
        "frequency_penalty": 0.1,
        "logit_bias": {"50256": -100},
        "n": 2,
        "max_completion_tokens": 9,
    }
    sent = payload(openai_chat, {"messages": TOOL_LOOP, "tools": [TOOL], **params})
    assert {k: sent[k] for k in params} == params and sent["messages"] == TOOL_LOOP and sent["tools"] == [TOOL]


# --- the coalescing key is what goes upstream ---------------------------------------------------


@pytest.mark.parametrize(
    "field,a,b",
    [
        ("seed", 1, 2),
        ("logprobs", True, False),
        ("user", "a", "b"),
        ("response_format", {"type": "json_object"}, {"type": "text"}),
        ("n", 1, 2),
        ("unknown_field", 1, None),
    ],
)
def test_requests_differing_in_any_forwarded_field_have_different_keys(field, a, b):
    def key(value):
        body = {"messages": [{"role": "user", "content": "hi"}]} | ({field: value} if value is not None else {})
        return coalescing_key("openai", "m", parse_chat(body).body)

    assert key(a) != key(b) and key(a) == key(a)


def test_owned_fields_do_not_change_the_key():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert coalescing_key("p", "m", parse_chat(base).body) == coalescing_key(
        "p", "m", parse_chat({**base, "stream": True, "stream_options": {"include_usage": True}, "model": "m"}).body
    )


# --- cross format: mapped or refused --------------------------------------------------------


def test_anthropic_maps_a_tool_conversation_images_and_structured_output():
    body = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Look"}, IMAGE]},
            *TOOL_LOOP,
        ],
        "tools": [TOOL],
        "parallel_tool_calls": False,
        "user": "u1",
        "top_k": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    }
    _, _, headers, data = anthropic.build_request(base_url="http://x", api_key=None, model="m", body=body)
    p = json.loads(data)
    assert p["system"] == "S" and p["top_k"] == 5 and p["metadata"] == {"user_id": "u1"}
    assert p["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    assert p["messages"][2] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}],
    }
    assert p["messages"][3] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "18C, clear"}]}
        ],
    }
    assert p["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    # structured outputs as generally available (output_config.format), no beta header
    assert p["output_config"] == {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    assert "output_format" not in p and not any(name == b"anthropic-beta" for name, _ in headers)
    assert anthropic.check(body) is None


def test_anthropic_maps_strict_tools_and_effort():
    strict = {"type": "function", "function": {**TOOL["function"], "strict": True}}
    p = payload(anthropic, {"messages": TOOL_LOOP, "tools": [strict, TOOL], "reasoning_effort": "medium"})
    assert [t.get("strict") for t in p["tools"]] == [True, None]  # said: sent; not said: left to the default
    assert p["output_config"] == {"effort": "medium"}
    assert "'reasoning_effort'" in anthropic.check({"messages": TOOL_LOOP, "reasoning_effort": "minimal"})
    # /v1/messages' output_config.effort "max" comes back to Anthropic as it was sent
    assert payload(anthropic, {"messages": TOOL_LOOP, "reasoning_effort": "max"})["output_config"] == {"effort": "max"}


def test_responses_and_agent_map_tool_calls_to_input_items():
    body = {
        "messages": TOOL_LOOP,
        "tools": [TOOL],
        "response_format": {"type": "json_object"},
        "reasoning_effort": "low",
    }
    p = payload(openai_responses, body)
    assert p["input"][1:] == [
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C, clear"},
    ]
    assert p["text"] == {"format": {"type": "json_object"}} and p["reasoning"] == {"effort": "low"}
    # a chat tool that says nothing keeps chat's meaning: not strict
    assert p["tools"] == [{"type": "function", **TOOL["function"], "strict": False}]
    q = payload(perplexity_agent, {"messages": TOOL_LOOP, "tools": [TOOL]}, model="openai/gpt-5")
    assert q["input"][0] == {"type": "message", "role": "user", "content": "Weather in Paris?"}
    assert q["input"][2] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": "18C, clear",
        "name": "get_weather",  # the Agent API takes it; some of its models need it
    }


def test_the_agent_api_takes_structured_output_effort_and_its_own_part_types():
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {**IMAGE, "image_url": {**IMAGE["image_url"], "detail": "auto"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And?"},
    ]
    q = payload(perplexity_agent, {"messages": messages, "response_format": schema, "reasoning_effort": "high"})
    assert q["response_format"] == schema and q["reasoning"] == {"effort": "high"}
    assert q["input"][0]["content"][1] == {"type": "input_image", "image_url": IMAGE["image_url"]["url"]}
    assert q["input"][1]["content"] == [{"type": "input_text", "text": "A cat."}]
    refused = {"messages": messages[:1], "response_format": {"type": "json_object"}}
    assert "'response_format'" in perplexity_agent.check(refused)
    low = {**IMAGE, "image_url": {**IMAGE["image_url"], "detail": "low"}}
    assert "'detail'" in perplexity_agent.check({"messages": [{"role": "user", "content": [low]}]})


def test_ollama_maps_options_json_mode_images_and_tools():
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}, *TOOL_LOOP[1:]],
        "seed": 3,
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 9,
    }
    p = payload(ollama, body)
    assert p["options"] == {"seed": 3, "num_predict": 9} and p["format"] == "json"
    assert p["messages"][0] == {"role": "user", "content": "hi", "images": ["iVBORw0KGgo="]}
    assert p["messages"][1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert p["messages"][2] == {"role": "tool", "content": "18C, clear", "tool_name": "get_weather"}


@pytest.mark.parametrize(
    "module,extra,named",
    [
        (anthropic, {"seed": 1}, "'seed'"),
        (anthropic, {"logprobs": True}, "'logprobs'"),
        (anthropic, {"n": 2}, "'n'"),
        (anthropic, {"response_format": {"type": "json_object"}}, "'response_format'"),
        (anthropic, {"frequency_penalty": 0.5}, "'frequency_penalty'"),
        (openai_responses, {"stop": ["x"]}, "'stop'"),
        (openai_responses, {"seed": 1}, "'seed'"),
        (perplexity_agent, {"temperature": 0.3}, "'temperature'"),
        (ollama, {"logit_bias": {"1": 2}}, "'logit_bias'"),
        (
            ollama,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}
                ]
            },
            "'messages[0].content[0]'",
        ),
        (anthropic, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "'messages[0].name'"),
    ],
)
def test_a_field_a_provider_cannot_honour_is_refused_by_name(module, extra, named):
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    problem = module.check(body)
    assert problem is not None and named in problem and module.__name__.split(".")[-1].split("_")[0] in problem


@pytest.mark.parametrize("module", [anthropic, openai_responses, perplexity_agent, ollama], ids=lambda m: m.__name__)
def test_fields_at_their_default_ask_nothing_and_pass(module):
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0,
        "response_format": {"type": "text"},
        "seed": None,
    }
    assert module.check(body) is None


# --- the answer in OpenAI's shape --------------------------------------------------------------


class _Admission:
    request_id = "r1"


def test_usage_is_left_out_when_the_provider_sent_none_never_zeros():
    completion = Completion(_Admission(), "m", 0)  # type: ignore[arg-type]
    for event in (ev.delta("hi"), ev.done("stop", None)):
        completion.add(event)
    assert "usage" not in json.loads(completion.response().body)
    renderer = ChunkRenderer(_Admission(), "m", 0, include_usage=True)  # type: ignore[arg-type]
    frames = [
        json.loads(f[6:]) for f in renderer.event(ev.done("stop", None)).split(b"\n\n") if f.startswith(b"data: {")
    ]
    assert [f["choices"] for f in frames if not f["choices"]] == []  # no usage chunk
    response = Response(_Admission(), "m", 0, {})  # type: ignore[arg-type]
    response.add(ev.done("stop", None))
    assert json.loads(response.response().body)["usage"] is None  # /v1/responses: null, not zeros


def test_refusal_reasoning_citations_and_fingerprint_in_openai_shape():
    completion = Completion(_Admission(), "m", 0)  # type: ignore[arg-type]
    for event in (
        ev.meta(system_fingerprint="fp"),
        ev.meta(reasoning="think"),
        ev.meta(refusal="no"),
        ev.meta(citations=["https://a"]),
        ev.meta(citations=["https://a", "https://b"]),
        ev.meta(tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
        ev.usage(1, 2),
        ev.done("tool_calls", None),
    ):
        completion.add(event)
    body = json.loads(completion.response().body)
    message = body["choices"][0]["message"]
    assert body["system_fingerprint"] == "fp" and body["citations"] == ["https://a", "https://b"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": "no",
        "reasoning_content": "think",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    renderer = ChunkRenderer(_Admission(), "m", 0, include_usage=False)  # type: ignore[arg-type]
    renderer.event(ev.meta(system_fingerprint="fp"))
    chunk = json.loads(renderer.event(ev.meta(refusal="no")).split(b"\n\n")[1][6:])
    assert chunk["system_fingerprint"] == "fp" and chunk["choices"][0]["delta"] == {"refusal": "no"}


def _sse_events(data: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in data.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"data" in lines and lines[b"data"].startswith(b"{"):
            out.append(((lines.get(b"event") or b"").decode(), json.loads(lines[b"data"])))
    return out


def _streamed_call(fragments: list[str]) -> list[dict]:
    start = ev.meta(tool_call_delta={"index": 0, "id": "c1", "name": "f", "arguments": ""})
    return [start, *(ev.meta(tool_call_delta={"index": 0, "arguments": f}) for f in fragments)]


def test_text_then_a_streamed_call_in_each_format():
    """Text, then a call streamed in two fragments, then the whole call: every front end
    closes the text before the call opens, sends each fragment once, and not the whole again."""
    from edge.anthropic_compat import MessageRenderer
    from edge.responses_compat import ResponseRenderer

    events = [
        ev.delta("Let me look."),
        *_streamed_call(['{"a":', "1}"]),
        ev.meta(tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]),
        ev.done("tool_calls", None),
    ]
    chunks = ChunkRenderer(_Admission(), "m", 0, include_usage=False)  # type: ignore[arg-type]
    frames = [data for _, data in _sse_events(b"".join(chunks.event(e) for e in events))]
    calls = [c for f in frames for c in f["choices"][0]["delta"].get("tool_calls") or []]
    assert calls == [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"a":'}},
        {"index": 0, "function": {"arguments": "1}"}},
    ]

    messages = MessageRenderer(_Admission(), "m")  # type: ignore[arg-type]
    anthropic_out = _sse_events(b"".join(messages.event(e) for e in events))
    shapes = [
        (name, d.get("index"), (d.get("content_block") or d.get("delta") or {}).get("type"))
        for name, d in anthropic_out
    ]
    assert shapes == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]

    renderer = ResponseRenderer(_Admission(), "m", 0, {})  # type: ignore[arg-type]
    responses_out = _sse_events(b"".join(renderer.event(e) for e in events))
    named = [(name, d.get("output_index")) for name, d in responses_out]
    assert named == [
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.completed", None),
    ]
    output = responses_out[-1][1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call"]
    assert output[1]["arguments"] == '{"a":1}' and output[0]["content"][0]["text"] == "Let me look."


@pytest.mark.parametrize("module", [anthropic, ollama], ids=lambda m: m.__name__)
def test_a_shape_a_mapping_cannot_take_is_a_refusal_not_a_crash(module):
    # the edge refuses this one (422); a body that reaches a mapping some other way (a
    # fallback's) must still be refused by name rather than crash the check (a 500)
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": 5},
    }
    assert "cannot take" in (module.check(body) or "")
    with pytest.raises(RequestError):
        parse_chat({"model": "x", **body})
