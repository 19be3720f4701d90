"""The official `openai` SDK, unmodified, against the real gateway and the simulated
provider (which records the body it received): every parameter reaches upstream, a
three-turn tool conversation works, JSON mode and `chat.completions.parse` return what the
provider sent, logprobs, n > 1 and system_fingerprint come back, requests that differ only
in `seed` are not coalesced, a streamed tool call arrives chunk by chunk as the provider
sent it, and a cross-format field that cannot be honoured is a 400
naming it. (LangChain's ChatOpenAI: tests/test_langchain.py.)"""

from __future__ import annotations

import json
import threading
import uuid

import openai
import pydantic
import pytest

from tests.support import data_events, get_json, running_gateway, stream_chat

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def unique(directive: str = "tokens=4") -> str:
    return f"fidelity {uuid.uuid4().hex[:10]}\n#sim {directive}"


def upstream(gateway, text: str) -> list[dict]:
    """The bodies the simulated provider received for the prompt `text`."""
    marker = text.split("\n")[0]
    return [r["body"] for r in get_json(gateway.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def test_every_parameter_reaches_the_provider(client, gateway):
    text = unique()
    params = {
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "user": "user-1",
        "metadata": {"team": "a"},
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"50256": -100},
        "temperature": 0.3,
        "max_completion_tokens": 40,
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
    }
    messages = [{"role": "developer", "content": "JSON please.", "name": "ops"}, {"role": "user", "content": text}]
    client.chat.completions.create(model="sim-1", messages=messages, tools=[WEATHER], **params)
    [body] = upstream(gateway, text)
    assert {k: body[k] for k in params} == params
    assert body["messages"] == messages and body["tools"] == [WEATHER] and body["stream"] is True


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}


def test_image_parts_reach_the_provider(client, gateway):
    text = unique()
    content = [{"type": "text", "text": text}, IMAGE]
    client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": content}])
    assert upstream(gateway, text)[0]["messages"] == [{"role": "user", "content": content}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_three_turn_tool_conversation(client, gateway, stream):
    text = unique("reply=tool_call tokens=3")
    messages: list = [{"role": "user", "content": text}]

    def ask():
        if not stream:
            return client.chat.completions.create(model="sim-1", messages=messages, tools=[WEATHER]).choices[0]
        with client.chat.completions.stream(model="sim-1", messages=messages, tools=[WEATHER]) as s:
            return s.get_final_completion().choices[0]

    first = ask()
    assert first.finish_reason == "tool_calls"
    [call] = first.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "sim"}
    assert call.id.startswith("call_sim")
    messages += [
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and clear"},
    ]
    second = ask()
    assert second.finish_reason == "stop" and second.message.content
    messages += [
        {"role": "assistant", "content": second.message.content},
        {"role": "user", "content": "thanks " + text},
    ]
    third = ask()
    assert third.finish_reason == "tool_calls"  # a new user turn: the model calls again
    bodies = upstream(gateway, text)
    assert len(bodies) == 3
    sent = bodies[1]["messages"]
    assert sent == messages[:3] and sent[1]["tool_calls"][0]["id"] == call.id  # as the client sent them
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "18C and clear"}
    assert bodies[2]["messages"] == messages


@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_returns_what_the_provider_sent(client, stream):
    text = unique("tokens=5")
    kwargs = {
        "model": "sim-1",
        "messages": [{"role": "user", "content": text}],
        "response_format": {"type": "json_object"},
    }
    if stream:
        content = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
        )
    else:
        content = client.chat.completions.create(**kwargs).choices[0].message.content
    assert set(json.loads(content)) == {"answer"}


class Weather(pydantic.BaseModel):
    city: str
    celsius: int
    sunny: bool


def test_structured_output_parses(client, gateway):
    text = unique()
    parsed = (
        client.chat.completions.parse(
            model="sim-1", messages=[{"role": "user", "content": text}], response_format=Weather
        )
        .choices[0]
        .message.parsed
    )
    assert parsed == Weather(city="sim", celsius=1, sunny=True)
    assert upstream(gateway, text)[0]["response_format"]["type"] == "json_schema"


def test_logprobs_n_and_fingerprint_come_back(client):
    text = unique("tokens=3")
    completion = client.chat.completions.create(
        model="sim-1", messages=[{"role": "user", "content": text}], n=2, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in completion.choices] == [0, 1] and completion.system_fingerprint == "fp_sim"
    first, second = completion.choices
    assert first.message.content != second.message.content
    assert "".join(t.token for t in first.logprobs.content) == first.message.content
    assert len(first.logprobs.content[0].top_logprobs) == 2
    chunks = list(
        client.chat.completions.create(
            model="sim-1", messages=[{"role": "user", "content": text}], n=2, logprobs=True, stream=True
        )
    )
    by_choice = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in (0, 1)
    }
    assert by_choice == {0: first.message.content, 1: second.message.content}
    assert all(c.system_fingerprint == "fp_sim" for c in chunks[1:])
    assert {c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason} == {"stop"}


def test_requests_differing_only_in_seed_are_not_coalesced(gateway):
    text = unique("tokens=20 token_interval_ms=30")
    results: dict[int, str] = {}

    def ask(seed: int) -> None:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
            results[seed] = (
                c.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": text}], seed=seed)
                .choices[0]
                .message.content
            )

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (1, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    seeds = sorted(body["seed"] for body in upstream(gateway, text))
    assert seeds[-1] == 2 and seeds.count(2) == 1 and len(results) == 2


@pytest.fixture(scope="module")
def anthropic_gateway(sim):
    """A gateway with an Anthropic account (the simulated provider speaking Anthropic's API)."""
    env = {"SIMULATED_BASE_URL": sim, "ANTHROPIC_BASE_URL": sim, "ANTHROPIC_API_KEY": "k", "ANTHROPIC_H2C": "1"}
    with running_gateway(env) as gw:
        yield gw


def test_an_unsupported_cross_format_field_is_a_400_naming_it(sim, anthropic_gateway):
    gw = anthropic_gateway
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as c:
        text = unique()
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="anthropic/claude-x", messages=[{"role": "user", "content": text}], seed=3)
        assert info.value.code == "unsupported_parameter" and "'seed'" in info.value.message
        messages = [
            {"role": "user", "content": text},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "3C"},
        ]
        answer = c.chat.completions.create(model="anthropic/claude-x", messages=messages, tools=[WEATHER])
        assert answer.choices[0].message.content
        [body] = [
            r["body"]
            for r in get_json(sim + "/stats")[1]["requests"]
            if r["path"] == "/v1/messages" and text.split("\n")[0] in json.dumps(r["body"])
        ]
        assert body["messages"][2] == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "3C"}]}],
        }


def test_a_streamed_tool_call_arrives_as_the_provider_sends_it(client, gateway):
    text = unique("reply=tool_call tokens=4")
    kwargs = {"model": "sim-1", "messages": [{"role": "user", "content": text}], "tools": [WEATHER]}
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    pieces = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    opening, *fragments = pieces
    # as OpenAI streams a call: the first chunk names it with empty arguments, then fragments
    assert opening.index == 0 and opening.id.startswith("call_sim") and opening.type == "function"
    assert opening.function.name == "get_weather" and opening.function.arguments == ""
    assert len(fragments) == 4  # the sim sent the arguments in four pieces: four chunks came
    assert all(f.id is None and f.function.name is None and f.function.arguments for f in fragments)
    assert json.loads("".join(f.function.arguments for f in fragments)) == {"city": "sim"}
    # the SDK's own accumulation sees the same call, delta by delta
    with client.chat.completions.stream(**kwargs) as stream:
        argument_deltas = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"]
        [call] = stream.get_final_completion().choices[0].message.tool_calls
    assert [d for d in argument_deltas if d] == [f.function.arguments for f in fragments]
    assert "".join(argument_deltas) == call.function.arguments
    assert call.function.parsed_arguments is None or call.function.parsed_arguments == {"city": "sim"}


def test_a_tool_call_streamed_by_anthropic_reaches_an_openai_client_in_pieces(sim, anthropic_gateway):
    text = unique("reply=tool_call tokens=3")
    kwargs = {"model": "anthropic/claude-x", "messages": [{"role": "user", "content": text}], "tools": [WEATHER]}
    with openai.OpenAI(base_url=anthropic_gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        chunks = [chunk for chunk in c.chat.completions.create(stream=True, **kwargs) if chunk.choices]
    pieces = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    opening, *fragments = pieces
    assert opening.id.startswith("toolu_sim") and opening.function.name == "get_weather"
    assert len(fragments) == 3  # Anthropic's three input_json_delta events, three chunks
    assert json.loads("".join(f.function.arguments for f in fragments)) == {"city": "sim"}
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["tool_calls"]
    [body] = [
        r["body"]
        for r in get_json(sim + "/stats")[1]["requests"]
        if r["path"] == "/v1/messages" and text.split("\n")[0] in json.dumps(r["body"])
    ]
    assert body["tools"][0]["name"] == "get_weather" and "input_schema" in body["tools"][0]


BAD_SHAPES = [
    ({"tools": "get_weather"}, "'tools'"),
    ({"tools": [{"type": "function", "function": "get_weather"}]}, "tools[0]"),
    ({"response_format": "json"}, "'response_format'"),
    ({"tool_choice": 5}, "'tool_choice'"),
    ({"max_completion_tokens": "5"}, "'max_completion_tokens'"),
    ({"parallel_tool_calls": "no"}, "'parallel_tool_calls'"),
    ({"user": 5}, "'user'"),
    ({"seed": 1.5}, "'seed'"),
    ({"logprobs": "yes"}, "'logprobs'"),
    ({"presence_penalty": "high"}, "'presence_penalty'"),
    ({"metadata": ["a"]}, "'metadata'"),
]


@pytest.mark.parametrize("extra,named", BAD_SHAPES, ids=[next(iter(e)) + str(i) for i, (e, _) in enumerate(BAD_SHAPES)])
def test_a_wrongly_typed_field_is_a_422_naming_it_whatever_the_provider(anthropic_gateway, extra, named):
    """OpenAI's own types, checked at the edge: a same-format provider would refuse them, and a
    cross-format adapter's mapping must never meet them (it crashed: a 500)."""
    with openai.OpenAI(base_url=anthropic_gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        for model in ("sim-1", "anthropic/claude-x"):
            with pytest.raises(openai.UnprocessableEntityError) as info:
                c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], extra_body=extra)
            assert info.value.code == "invalid_request" and named in info.value.message


def test_api_chat_takes_the_openai_message_shapes(gateway):
    """sluice's own /api/chat accepts what /v1 accepts (`content: null` with `tool_calls`,
    role `tool` with `tool_call_id`, content parts with an image, `name`) and forwards it."""
    text = unique("tokens=3")
    messages = [
        {"role": "developer", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}, IMAGE]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3C"},
        {"role": "user", "content": text},
    ]
    status, _, events = stream_chat(gateway.url + "/api/chat", {"messages": messages, "tools": [WEATHER], "seed": 5})
    assert status == 200 and data_events(events)[-1]["type"] == "done"
    [body] = upstream(gateway, text)
    assert body["messages"] == messages and body["tools"] == [WEATHER] and body["seed"] == 5
    status, _, error = stream_chat(gateway.url + "/api/chat", {"messages": [{"role": "tool", "content": "x"}]})
    assert status == 422 and "messages[0].tool_call_id" in error["error"]["message"]
