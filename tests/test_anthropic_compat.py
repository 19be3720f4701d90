"""POST /v1/messages (edge/anthropic_compat.py) driven by the official `anthropic` SDK,
unmodified, against the real gateway in front of the simulated provider (also
`messages.count_tokens`: forwarded to an Anthropic account, refused for another provider); plus raw-HTTP
checks of the event stream the SDK hides."""

from __future__ import annotations

import concurrent.futures
import json
import uuid

import anthropic
import pydantic
import pytest

from sim import formats
from tests.support import SSEClient, get_json, request, running_gateway, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(gateway):
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def unique(directive: str) -> str:
    return f"anthropic {uuid.uuid4().hex[:10]}\n#sim {directive}"


def expected(conversation: list[dict], n: int) -> str:
    return "".join(formats.make_tokens(conversation, n))


def sim_calls(gateway, text: str) -> list[dict]:
    marker = text.split("\n")[0]
    return [r for r in get_json(gateway.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def cancelled_calls(gateway, text: str) -> list[dict]:
    ids = {r["call_id"] for r in sim_calls(gateway, text)}
    return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]


def followers(gateway) -> int:
    return get_json(gateway.url + "/api/metrics/performance?last_n=100000")[1]["coalesce"]["followers"]


def test_messages_create(client, gateway):
    text = unique("tokens=5")
    message = client.messages.create(
        model="sim-1", max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": text}]
    )
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == expected(conversation, 5)
    assert message.stop_reason == "end_turn" and message.model == "sim-1"
    assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0
    upstream = sim_calls(gateway, text)[0]["body"]
    assert upstream.get("max_completion_tokens") == 100 or upstream.get("max_tokens") == 100


def test_messages_stream_yields_the_documented_events(client):
    text = unique("tokens=4")
    blocks = [{"type": "text", "text": text}]
    with client.messages.stream(model="sim-1", max_tokens=50, messages=[{"role": "user", "content": blocks}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    raw = [k for k in kinds if k not in ("text", "input_json")]  # the SDK's own derived events
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert raw.count("content_block_delta") == 4
    assert final.content[0].text == expected([{"role": "user", "content": text}], 4)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4


def test_raw_stream_opens_with_a_ping_and_names_every_event(gateway):
    body = {
        "model": "sim-1",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": unique("tokens=2")}],
    }
    client = SSEClient(gateway.url + "/v1/messages", body)
    try:
        events = client.read_all()
    finally:
        client.close()
    assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
    assert events[0] == ("ping", {"type": "ping"})
    assert all(data["type"] == name for name, data in events)
    names = [name for name, _ in events if name != "ping"]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_history_with_tool_use_and_tool_result_blocks_is_mapped(client, gateway):
    text = unique("tokens=2")
    messages = [
        {"role": "user", "content": "what is the weather?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "text", "text": text},
            ],
        },
    ]
    tools = [{"name": "weather", "description": "the weather", "input_schema": {"type": "object", "properties": {}}}]
    client.messages.create(model="sim-1", max_tokens=30, messages=messages, tools=tools, tool_choice={"type": "auto"})
    upstream = sim_calls(gateway, text)[0]["body"]
    assert upstream["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "the weather",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    assert upstream["tool_choice"] == "auto"
    assistant = upstream["messages"][1]
    assert assistant["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city":"Oslo"}'}
    assert upstream["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert upstream["messages"][3]["content"] == text


def test_unsupported_block_and_bad_shapes_are_400s_in_anthropic_shape(client):
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="sim-1", max_tokens=10, messages=[{"role": "user", "content": [document]}])
    assert info.value.status_code == 400
    assert info.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages[0].content[0]: document blocks are not supported in user messages",
        },
    }
    bad_call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": "not an object"}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="sim-1", max_tokens=10, messages=[{"role": "assistant", "content": [bad_call]}])
    assert info.value.body["error"]["message"] == "messages[0].content[0].input: must be an object"
    status, _, body = request(
        "POST",
        client.base_url.__str__().rstrip("/") + "/v1/messages",
        {"model": "sim-1", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 400 and json.loads(body)["error"]["message"].startswith("max_tokens")


def test_upstream_errors_before_and_during_the_stream(client):
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(model="sim-1", max_tokens=10, messages=[{"role": "user", "content": unique("fail=500")}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "api_error"
    received = ""
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(
            model="sim-1", max_tokens=50, messages=[{"role": "user", "content": unique("tokens=8 fail=error_mid")}]
        ) as stream:
            for piece in stream.text_stream:
                received += piece
    assert received and info.value.body["type"] == "error"


def test_closing_the_stream_aborts_the_upstream_call(client, gateway):
    text = unique("tokens=500 token_interval_ms=20")
    received = ""
    with client.messages.stream(model="sim-1", max_tokens=1000, messages=[{"role": "user", "content": text}]) as stream:
        for piece in stream.text_stream:
            received += piece
            if len(received.split()) >= 2:
                break
    observed = wait_until(
        lambda: cancelled_calls(gateway, text), timeout=5, message="the sim to see the call cancelled"
    )
    assert observed[0]["tokens_sent"] < 500


def test_identical_streams_coalesce_and_show_in_metrics(client, gateway):
    text = unique("ttft_ms=600 tokens=3")
    before = followers(gateway)

    def one() -> str:
        with client.messages.stream(model="sim-1", max_tokens=20, messages=[{"role": "user", "content": text}]) as s:
            return s.get_final_text()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: one(), range(6)))
    assert set(answers) == {expected([{"role": "user", "content": text}], 3)}
    assert len(sim_calls(gateway, text)) == 1
    wait_until(
        lambda: followers(gateway) >= before + 5, timeout=10, message="the followers in /api/metrics/performance"
    )


def test_count_tokens_is_forwarded_to_an_anthropic_account(sim):
    env = {"SIMULATED_BASE_URL": sim, "ANTHROPIC_BASE_URL": sim, "ANTHROPIC_API_KEY": "k-count", "ANTHROPIC_H2C": "1"}
    text = unique("tokens=3")
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    with (
        running_gateway(env) as gw,
        anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=20) as c,
    ):
        counted = c.messages.count_tokens(
            model="anthropic/claude-x", system="Be brief.", messages=messages, tools=tools
        )
        # A count the provider refuses is the provider's status, in Anthropic's error shape.
        with pytest.raises(anthropic.RateLimitError) as refused:
            c.messages.count_tokens(
                model="anthropic/claude-x",
                messages=[{"role": "user", "content": unique("fail=429 retry_after_s=none")}],
            )
        assert refused.value.body["error"]["type"] == "rate_limit_error"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert counted.input_tokens == sum(len(t["content"].split()) + 3 for t in turns)  # the sim's count
    [call] = [
        r
        for r in get_json(sim + "/stats")[1]["requests"]
        if r["path"] == "/v1/messages/count_tokens" and text.split("\n")[0] in json.dumps(r["body"])
    ]
    # Anthropic's own body, as the client sent it, model mapped; the account's key
    assert call["body"] == {"model": "claude-x", "system": "Be brief.", "messages": messages, "tools": tools}
    assert "max_tokens" not in call["body"] and call["auth"] == ["x-api-key"]


def test_count_tokens_for_another_provider_is_a_clear_400(client, gateway):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.count_tokens(model="sim-1", messages=[{"role": "user", "content": "how long is this?"}])
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "Anthropic accounts only" in info.value.body["error"]["message"]
    assert "'simulated'" in info.value.body["error"]["message"]


def test_a_streamed_tool_call_is_a_tool_use_block_with_input_json_deltas(client, gateway):
    text = unique("reply=tool_call tokens=4")
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    with client.messages.stream(
        model="sim-1", max_tokens=50, tools=tools, messages=[{"role": "user", "content": text}]
    ) as stream:
        events = list(stream)
        message = stream.get_final_message()
    kinds = [(e.type, getattr(getattr(e, "content_block", None), "type", None)) for e in events]
    assert ("content_block_start", "tool_use") in kinds
    starts = [e for e in events if e.type == "content_block_start"]
    assert [b.content_block.type for b in starts] == ["tool_use"] and starts[0].content_block.name == "get_weather"
    partials = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(partials) == 4 and json.loads("".join(partials)) == {"city": "sim"}  # the sim's four pieces
    assert [e.type for e in events if e.type == "input_json"] == ["input_json"] * 4  # the SDK's own accumulation
    [block] = message.content
    assert block.type == "tool_use" and block.input == {"city": "sim"} and block.id.startswith("call_sim")
    assert message.stop_reason == "tool_use"


# --- fidelity (issue 14): what the client asked for reaches the provider --------------------------


class Weather(pydantic.BaseModel):
    city: str
    celsius: int
    sunny: bool


def test_structured_output_reaches_the_provider_and_parses(client, gateway):
    text = unique("tokens=4")
    message = client.messages.parse(
        model="sim-1", max_tokens=100, messages=[{"role": "user", "content": text}], output_format=Weather
    )
    assert message.parsed_output == Weather(city="sim", celsius=1, sunny=True)  # the sim's example of the schema
    [upstream] = [call["body"] for call in sim_calls(gateway, text)]
    assert upstream["response_format"]["type"] == "json_schema"
    assert set(upstream["response_format"]["json_schema"]["schema"]["properties"]) == {"city", "celsius", "sunny"}


def test_images_user_effort_and_tool_options_reach_the_provider(client, gateway):
    text = unique("tokens=2")
    content = [
        {"type": "text", "text": text},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
    ]
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {}}, "strict": True}
    client.messages.create(
        model="sim-1",
        max_tokens=30,
        messages=[{"role": "user", "content": content}],
        tools=[tool],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        metadata={"user_id": "user-1"},
        output_config={"effort": "low"},
    )
    [upstream] = [call["body"] for call in sim_calls(gateway, text)]
    assert upstream["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        }
    ]
    assert upstream["tools"][0]["function"]["strict"] is True and upstream["parallel_tool_calls"] is False
    assert upstream["user"] == "user-1" and upstream["reasoning_effort"] == "low"


def test_a_non_streaming_client_that_gives_up_cancels_the_upstream_call(gateway):
    text = unique("tokens=500 token_interval_ms=20")
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=0.5) as impatient:
        with pytest.raises(anthropic.APITimeoutError):
            impatient.messages.create(model="sim-1", max_tokens=1000, messages=[{"role": "user", "content": text}])
    observed = wait_until(
        lambda: cancelled_calls(gateway, text), timeout=5, message="the sim to see the call cancelled"
    )
    assert observed[0]["tokens_sent"] < 500


def test_a_count_tokens_client_that_gives_up_cancels_the_upstream_call(sim):
    env = {"SIMULATED_BASE_URL": sim, "ANTHROPIC_BASE_URL": sim, "ANTHROPIC_API_KEY": "k-count", "ANTHROPIC_H2C": "1"}
    text = unique("ttft_ms=5000")
    with running_gateway(env) as gw:
        gw.sim = sim
        with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=0.5) as impatient:
            with pytest.raises(anthropic.APITimeoutError):
                impatient.messages.count_tokens(
                    model="anthropic/claude-x", messages=[{"role": "user", "content": text}]
                )
        wait_until(lambda: cancelled_calls(gw, text), timeout=5, message="the sim to see the count cancelled")
