"""The new front ends' pure parts: model routing and aliases (edge/models.py and their
configuration), the Anthropic / Responses / embeddings request mappings, and the
embeddings adapter (protocols/providers/openai_embeddings.py)."""

from __future__ import annotations

import json

import pytest

from edge import models
from edge.anthropic_compat import parse_messages
from edge.chat_request import RequestError, parse_chat
from edge.embeddings import parse_embeddings
from edge.openai_compat import parse_openai, status_of_error
from edge.responses_compat import parse_responses
from protocols import config
from protocols.keys import coalescing_key
from protocols.providers import openai_embeddings

pytestmark = pytest.mark.unit


def settings(**env) -> config.Settings:
    return config.load({"OPENAI_API_KEY": "sk-x", **env})


# --- model routing --------------------------------------------------------------------------


def test_aliases_resolve_and_provider_prefixes_route():
    s = settings(SLUICE_MODEL_ALIASES="gpt-4o=openai/gpt-4o, fast=simulated")
    assert s.model_aliases == {"gpt-4o": ("openai", "gpt-4o"), "fast": ("simulated", "sim-1")}
    assert models.resolve(None, "gpt-4o", s) == ("openai", "gpt-4o")
    assert models.resolve(None, "openai/gpt-4.1", s) == ("openai", "gpt-4.1")
    assert models.resolve(None, "openai", s) == ("openai", None)
    assert models.resolve(None, "llama-anything", s) == (None, "llama-anything")
    assert models.resolve("simulated", "gpt-4o", s) == ("simulated", "gpt-4o")  # an explicit provider wins


@pytest.mark.parametrize(
    "aliases, says",
    [
        ("gpt-4o", "expected alias=provider"),
        ("x=nowhere/m", "not a configured provider"),
        ("x=openai/a,x=openai/b", "defined twice"),
        ("openai/x=openai/y", "may not start with a provider name"),
    ],
)
def test_bad_aliases_are_refused_naming_the_variable(aliases, says):
    with pytest.raises(config.ConfigError, match=says) as info:
        settings(SLUICE_MODEL_ALIASES=aliases)
    assert "SLUICE_MODEL_ALIASES" in str(info.value)


def test_model_listing_and_lookup_follow_the_key():
    s = settings(SLUICE_MODEL_ALIASES="gpt-4o=openai/gpt-4o")
    everything = lambda provider, model: True  # noqa: E731
    assert [m["id"] for m in models.listing(s, everything)] == [
        "simulated/sim-1",
        "openai/gpt-4o-mini",
        "openai_responses/gpt-4o-mini",
        "gpt-4o",
    ]
    only_sim = lambda provider, model: provider == "simulated"  # noqa: E731
    assert [m["id"] for m in models.listing(s, only_sim)] == ["simulated/sim-1"]
    assert models.lookup("gpt-4o", s, everything)["owned_by"] == "openai"
    assert models.lookup("gpt-4o", s, only_sim) is None
    assert models.lookup("sim-1", s, everything)["id"] == "sim-1"
    assert models.lookup("unknown-model", s, everything) is None
    assert models.lookup("anthropic/claude", s, everything) is None  # not configured


def test_cors_origins():
    assert settings().cors_origins == ()
    assert settings(SLUICE_CORS_ORIGINS="https://a.example, http://localhost:3000/").cors_origins == (
        "https://a.example",
        "http://localhost:3000",
    )
    assert settings(SLUICE_CORS_ORIGINS="*").cors_origins == ("*",)
    with pytest.raises(config.ConfigError, match="SLUICE_CORS_ORIGINS"):
        settings(SLUICE_CORS_ORIGINS="a.example/path")


# --- Anthropic Messages ---------------------------------------------------------------------


def test_anthropic_request_maps_to_the_normalized_body():
    model, body, stream, coalesce = parse_messages(
        {
            "model": "claude",
            "max_tokens": 50,
            "stream": True,
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_k": 3,
            "system": [{"type": "text", "text": "Be brief."}],
            "metadata": {"user_id": "u"},
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "yo"}],
                },
            ],
        }
    )
    assert (model, stream, coalesce) == ("claude", True, True)
    assert body == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ],
        "max_tokens": 50,
        "temperature": 0.5,
        "top_k": 3,
        "stop": ["END"],
        "user": "u",  # metadata.user_id: chat's counterpart (issue 14)
    }


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "1", "name": "f", "input": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"temperature": 1.5}, "temperature"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ],
)
def test_anthropic_bad_requests_name_the_field(change, field):
    data = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(RequestError) as info:
        parse_messages(data)
    assert info.value.status == 400 and info.value.message.startswith(field)


def test_anthropic_tools_are_never_coalesced():
    _, body, _, _ = parse_messages(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "f"},
        }
    )
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert coalescing_key("simulated", "m", body) == ""


# --- Responses ------------------------------------------------------------------------------


def test_responses_request_maps_to_the_normalized_body():
    model, body, stream, _, echo = parse_responses(
        {"model": "gpt-4o", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 20, "store": True}
    )
    assert model == "gpt-4o" and stream is False and echo["max_output_tokens"] == 20
    assert body == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "max_tokens": 20,
    }


def test_consecutive_function_calls_share_one_assistant_turn():
    _, body, _, _, _ = parse_responses(
        {
            "input": [
                {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
                {"type": "reasoning", "summary": []},
            ]
        }
    )
    assert len(body["messages"]) == 1 and [c["id"] for c in body["messages"][0]["tool_calls"]] == ["a", "b"]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"input": []}, "input"),
        ({"input": [{"type": "file_search_call"}]}, "input[0].type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        # an unhashable role was looked up in a dict: TypeError, a 500 (probed)
        ({"input": [{"type": "message", "role": ["user"], "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": {"a": 1}, "content": "hi"}]}, "input[0].role"),
        # only reasoning items: nothing left to send (chat refuses empty messages too)
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
        ({"input": [{"type": "reasoning"}], "instructions": "be brief"}, "input"),
        # values of a type OpenAI's API does not take went upstream as sent (chat refuses them)
        ({"input": "x", "user": 5}, "user"),
        ({"input": "x", "service_tier": ["auto"]}, "service_tier"),
        ({"input": "x", "prompt_cache_key": {}}, "prompt_cache_key"),
        ({"input": "x", "reasoning": {"effort": {"level": "high"}}}, "reasoning.effort"),
        ({"input": "x", "text": {"verbosity": 3}}, "text.verbosity"),
    ],
)
def test_responses_bad_requests_name_the_field(data, field):
    with pytest.raises(RequestError) as info:
        parse_responses(data)
    assert info.value.status == 422 and info.value.message.startswith(field)


# --- the flags every front end reads (edge/chat_request.py) ---------------------------------

ANTHROPIC = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def coalesce_of(front_end: str, data: dict, header: str | None) -> bool:
    if front_end == "anthropic":
        return parse_messages({**ANTHROPIC, **data}, header)[3]
    if front_end == "responses":
        return parse_responses({"input": "hi", **data}, header)[3]
    if front_end == "embeddings":
        return parse_embeddings({"model": "e", "input": "hi", **data}, header)[2]
    if front_end == "openai":
        return parse_openai({**CHAT, **data}, header)[0].coalesce
    return parse_chat({**CHAT, **data}, header).coalesce


FRONT_ENDS = ("sluice", "openai", "anthropic", "responses", "embeddings")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_coalescing_is_on_unless_the_body_or_the_header_turns_it_off(front_end):
    assert coalesce_of(front_end, {}, None) is True
    assert coalesce_of(front_end, {}, "on") is True
    assert coalesce_of(front_end, {"coalesce": False}, None) is False
    for off in ("off", " OFF ", "0", "false", "no"):
        assert coalesce_of(front_end, {"coalesce": True}, off) is False


@pytest.mark.parametrize(
    "front_end, status, message",
    [
        ("sluice", 422, "'coalesce' must be true or false"),
        ("openai", 422, "'coalesce' must be true or false"),
        ("embeddings", 422, "'coalesce' must be true or false"),
        ("anthropic", 400, "coalesce: must be true or false"),
        ("responses", 422, "coalesce: must be true or false"),
    ],
)
def test_a_bad_coalesce_is_refused_in_each_front_ends_own_words(front_end, status, message):
    with pytest.raises(RequestError) as info:
        coalesce_of(front_end, {"coalesce": "yes"}, None)
    assert (info.value.status, info.value.message) == (status, message)


def test_stream_tools_and_sampling_numbers_are_read_alike_by_the_front_ends():
    assert parse_messages({**ANTHROPIC, "stream": None})[2] is False
    assert parse_responses({"input": "hi", "stream": True})[2] is True
    assert parse_openai({**CHAT, "stream": None}, None)[1] is False
    for parse, data, status, message in (
        (parse_messages, {**ANTHROPIC, "stream": "yes"}, 400, "stream: must be true or false"),
        (parse_responses, {"input": "hi", "stream": 1}, 422, "stream: must be true or false"),
        (lambda d: parse_openai(d, None), {**CHAT, "stream": "yes"}, 422, "'stream' must be true or false"),
        (parse_messages, {**ANTHROPIC, "tools": {}}, 400, "tools: must be an array"),
        (parse_responses, {"input": "hi", "tools": "f"}, 422, "tools: must be an array"),
        (parse_messages, {**ANTHROPIC, "temperature": 1.5}, 400, "temperature: must be a number between 0 and 1"),
        (parse_responses, {"input": "hi", "top_p": -0.1}, 422, "top_p: must be a number between 0 and 1"),
        (parse_chat, {**CHAT, "temperature": "hot"}, 422, "'temperature' must be a number between 0 and 2"),
        (parse_chat, {**CHAT, "top_p": float("nan")}, 422, "'top_p' must be a number between 0 and 1"),
    ):
        with pytest.raises(RequestError) as info:
            parse(data)
        assert (info.value.status, info.value.message) == (status, message)
    # An empty tools array asks for no tools: neither body carries the key.
    assert "tools" not in parse_messages({**ANTHROPIC, "tools": []})[1]
    assert "tools" not in parse_responses({"input": "hi", "tools": []})[1]


@pytest.mark.parametrize(
    "end, status",
    [
        ({"code": "upstream_4xx", "status": 422}, 422),
        ({"code": "upstream_4xx", "status": 401}, 400),  # the other provider 4xx answer 400
        ({"code": "upstream_429"}, 429),
        ({"code": "upstream_timeout"}, 504),
        ({"code": "disconnected"}, 499),
        ({"code": "upstream_5xx"}, 502),
        ({}, 502),
    ],
)
def test_a_stream_ending_in_error_answers_a_non_streamed_request_with_its_status(end, status):
    assert status_of_error({"type": "error", **end}) == status


# --- embeddings -----------------------------------------------------------------------------


def test_embeddings_request_and_its_coalescing_key():
    model, body, coalesce = parse_embeddings({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})
    assert body == {"embeddings": {"input": ["a", "b"], "encoding_format": "base64"}} and coalesce
    same = coalescing_key("openai", "e", body)
    assert same and same == coalescing_key("openai", "e", json.loads(json.dumps(body)))
    other = parse_embeddings({"model": "e", "input": ["a", "c"], "encoding_format": "base64"})[1]
    assert coalescing_key("openai", "e", other) != same
    for bad in (
        {"model": "e", "input": ""},
        {"model": "e", "input": [1.5]},
        {"model": "e", "input": "x", "dimensions": 0},
    ):
        with pytest.raises(RequestError):
            parse_embeddings(bad)


@pytest.mark.parametrize("field", ["embeddings", "count_tokens"])
def test_a_chat_body_cannot_name_another_kind_of_call(field):
    """`embeddings` / `count_tokens` in a normalized body pick another adapter (adapter_for):
    taken from a chat body as it came, they turned a chat request into an embeddings or a
    count call (an empty 200 answer), past the embeddings route's provider check."""
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: {"input": "x"}}
    with pytest.raises(RequestError) as info:
        parse_chat(data)
    assert info.value.status == 400 and info.value.code == "unsupported_parameter" and field in info.value.message
    with pytest.raises(RequestError):
        parse_openai(data, None)


def test_embeddings_adapter_reads_one_json_body_split_anywhere():
    answer = json.dumps(
        {
            "object": "list",
            "model": "e",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
    ).encode()
    for cut in (1, len(answer) // 2, len(answer) - 1):
        parser = openai_embeddings.Parser()
        events = parser.feed(answer[:cut]) + parser.feed(answer[cut:]) + parser.close()
        assert [e["type"] for e in events] == ["meta", "usage", "finish"]
        assert events[0]["embeddings"]["data"][0]["embedding"] == [0.5]
        assert events[1]["usage"]["prompt_tokens"] == 2
    parser = openai_embeddings.Parser()
    assert parser.feed(b'{"data": 5}') == [] and parser.close()[0]["code"] == "upstream_malformed"
    parser = openai_embeddings.Parser()
    parser.feed(b'{"error": {"type": "rate_limit_error", "message": "slow down"}}')
    assert parser.close() == [{"type": "error", "code": "upstream_429", "message": "slow down"}]


def test_embeddings_request_goes_to_the_providers_embeddings_path():
    method, url, headers, payload = openai_embeddings.build_request(
        base_url="https://api.openai.com/v1",
        api_key="sk-x",
        model="text-embedding-3-small",
        body={"embeddings": {"input": "hi", "dimensions": 8}},
    )
    assert (method, url) == ("POST", "https://api.openai.com/v1/embeddings")
    assert json.loads(payload) == {"model": "text-embedding-3-small", "input": "hi", "dimensions": 8}
    assert (b"authorization", b"Bearer sk-x") in headers
