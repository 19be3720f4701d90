"""POST /v1/responses (edge/responses_compat.py) driven by the official `openai` SDK,
unmodified (`responses.create`, streamed and not), against the real gateway in front of
the simulated provider."""

from __future__ import annotations

import concurrent.futures
import json
import uuid

import openai
import pydantic
import pytest

from sim import formats
from tests.support import SSEClient, get_json, wait_until

pytestmark = pytest.mark.integration

DOCUMENTED = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def unique(directive: str) -> str:
    return f"responses {uuid.uuid4().hex[:10]}\n#sim {directive}"


def expected(conversation: list[dict], n: int) -> str:
    return "".join(formats.make_tokens(conversation, n))


def sim_calls(gateway, text: str) -> list[dict]:
    marker = text.split("\n")[0]
    return [r for r in get_json(gateway.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def test_non_streamed_response(client, gateway):
    text = unique("tokens=5")
    response = client.responses.create(model="sim-1", input=text, instructions="Be brief.", max_output_tokens=64)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == expected(conversation, 5)
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.output_tokens == 5 and response.usage.total_tokens > 5
    assert response.instructions == "Be brief." and response.max_output_tokens == 64
    upstream = sim_calls(gateway, text)[0]["body"]
    assert upstream["messages"][0] == {"role": "system", "content": "Be brief."}


def test_streamed_response_yields_the_documented_events(client):
    text = unique("tokens=3")
    items = [
        {"role": "developer", "content": "Terse."},
        {"role": "user", "content": [{"type": "input_text", "text": text}]},
    ]
    events = list(client.responses.create(model="sim-1", input=items, stream=True))
    kinds = [e.type for e in events]
    assert [k for i, k in enumerate(kinds) if k not in kinds[:i]] == DOCUMENTED
    assert kinds.count("response.output_text.delta") == 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
    conversation = [{"role": "system", "content": "Terse."}, {"role": "user", "content": text}]
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert answer == expected(conversation, 3)
    done = events[-1].response
    assert done.status == "completed" and done.output_text == answer and done.usage.output_tokens == 3


def test_the_sdk_stream_helper_accumulates_the_answer(client):
    text = unique("tokens=4")
    with client.responses.stream(model="sim-1", input=text) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == expected([{"role": "user", "content": text}], 4)


def test_function_call_items_map_to_the_normalized_tool_shape(client, gateway):
    text = unique("tokens=2")
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "user", "content": text},
    ]
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}]
    client.responses.create(model="sim-1", input=items, tools=tools)
    upstream = sim_calls(gateway, text)[0]["body"]
    assert upstream["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert upstream["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert upstream["tools"][0]["function"]["name"] == "weather"


def test_a_streamed_function_call_arrives_in_pieces(client):
    text = unique("reply=tool_call tokens=4")
    tools = [
        {
            "type": "function",
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    with client.responses.stream(model="sim-1", input=text, tools=tools) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call"] and added[0].item.arguments == ""
    assert added[0].item.name == "weather" and added[0].item.call_id.startswith("call_sim")
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) == 4 and json.loads("".join(deltas)) == {"city": "sim"}  # the sim's four pieces
    assert kinds.index("response.function_call_arguments.delta") < kinds.index("response.function_call_arguments.done")
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    [call] = final.output
    assert call.type == "function_call" and call.arguments == "".join(deltas) and call.status == "completed"


def test_errors(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.responses.create(
            model="sim-1", input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]
        )
    assert "input[0].content[0]" in info.value.message and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(model="sim-1", input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.UnprocessableEntityError) as info:  # was a 500: an unhashable role
        client.responses.create(model="sim-1", input=[{"role": ["user"], "content": "hi"}])
    assert "input[0].role" in info.value.message
    with pytest.raises(openai.UnprocessableEntityError):  # was sent upstream with no message at all
        client.responses.create(model="sim-1", input=[{"type": "reasoning", "id": "rs_1", "summary": []}])
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="sim-1", input=unique("fail=500"))
    events = list(client.responses.create(model="sim-1", input=unique("tokens=8 fail=error_mid"), stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "upstream_5xx"


def test_closing_the_stream_aborts_the_upstream_call(client, gateway):
    text = unique("tokens=500 token_interval_ms=20")
    stream = client.responses.create(model="sim-1", input=text, stream=True)
    deltas = 0
    for event in stream:
        deltas += event.type == "response.output_text.delta"
        if deltas >= 2:
            break
    stream.close()

    def cancelled():
        ids = {r["call_id"] for r in sim_calls(gateway, text)}
        return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]

    observed = wait_until(cancelled, timeout=5, message="the sim to see the call cancelled")
    assert observed[0]["tokens_sent"] < 500


def test_identical_streams_coalesce_and_show_in_metrics(gateway):
    text = unique("ttft_ms=600 tokens=3")
    body = {"model": "sim-1", "input": text, "stream": True}
    perf = gateway.url + "/api/metrics/performance?last_n=100000"
    before = get_json(perf)[1]["coalesce"]["followers"]

    def one():
        client = SSEClient(gateway.url + "/v1/responses", body)
        try:
            return client.read_all()
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(lambda _: one(), range(6)))
    assert all(events[-1][0] == "response.completed" for events in streams)
    assert len(sim_calls(gateway, text)) == 1
    wait_until(
        lambda: get_json(perf)[1]["coalesce"]["followers"] >= before + 5,
        timeout=10,
        message="the followers in /api/metrics/performance",
    )


# --- fidelity (issue 14): what the client asked for reaches the provider, or is refused ----------


class Weather(pydantic.BaseModel):
    city: str
    celsius: int
    sunny: bool


def test_structured_output_reaches_the_provider_and_parses(client, gateway):
    text = unique("tokens=4")
    parsed = client.responses.parse(model="sim-1", input=text, text_format=Weather).output_parsed
    assert parsed == Weather(city="sim", celsius=1, sunny=True)  # the sim's example of the schema
    [upstream] = [call["body"] for call in sim_calls(gateway, text)]
    assert upstream["response_format"]["type"] == "json_schema"
    assert upstream["response_format"]["json_schema"]["name"] == "Weather"
    assert upstream["response_format"]["json_schema"]["schema"]["required"] == ["city", "celsius", "sunny"]
    text = unique("tokens=4")
    answer = client.responses.create(model="sim-1", input=text, text={"format": {"type": "json_object"}})
    assert set(json.loads(answer.output_text)) == {"answer"} and answer.text.format.type == "json_object"


def test_every_mapped_parameter_reaches_the_provider(client, gateway):
    text = unique("tokens=2")
    image = "data:image/png;base64,iVBORw0KGgo="
    tool = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}, "strict": True}
    client.responses.create(
        model="sim-1",
        input=[
            {
                "role": "user",
                "content": [{"type": "input_text", "text": text}, {"type": "input_image", "image_url": image}],
            }
        ],
        tools=[tool],
        user="user-1",
        metadata={"team": "a"},
        parallel_tool_calls=False,
        reasoning={"effort": "low", "summary": "auto"},
        text={"verbosity": "low"},
        safety_identifier="s-1",
        prompt_cache_key="k-1",
        include=["reasoning.encrypted_content"],
        truncation="disabled",
    )
    [upstream] = [call["body"] for call in sim_calls(gateway, text)]
    assert upstream["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}],
        }
    ]
    assert upstream["tools"][0]["function"]["strict"] is True
    sent = {k: upstream.get(k) for k in ("user", "metadata", "parallel_tool_calls", "reasoning_effort", "verbosity")}
    assert sent == {
        "user": "user-1",
        "metadata": {"team": "a"},
        "parallel_tool_calls": False,
        "reasoning_effort": "low",
        "verbosity": "low",
    }
    assert upstream["safety_identifier"] == "s-1" and upstream["prompt_cache_key"] == "k-1"


def test_a_field_sluice_cannot_honour_is_a_400_naming_it(client, gateway):
    for extra, named in (
        ({"max_tool_calls": 3}, "'max_tool_calls'"),
        ({"top_logprobs": 2}, "'top_logprobs'"),
        ({"frobnicate": True}, "'frobnicate'"),
    ):
        text = unique("tokens=2")
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="sim-1", input=text, extra_body=extra)
        assert info.value.code == "unsupported_parameter" and named in info.value.message
        assert not sim_calls(gateway, text)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.responses.create(model="sim-1", input="hi", conversation="conv_1")
    assert "conversation" in info.value.message


def test_a_non_streaming_client_that_gives_up_cancels_the_upstream_call(gateway):
    text = unique("tokens=500 token_interval_ms=20")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=0.5) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.responses.create(model="sim-1", input=text)

    def cancelled():
        ids = {r["call_id"] for r in sim_calls(gateway, text)}
        return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]

    observed = wait_until(cancelled, timeout=5, message="the sim to see the call cancelled")
    assert observed[0]["tokens_sent"] < 500
