"""LangChain's `ChatOpenAI` (package langchain-openai), unmodified, against the real gateway
and the simulated provider (which records every body it received): structured output by
json_schema and by function calling, a tool loop with `bind_tools` (the model asks for a
tool, the tool's answer goes back, the final answer arrives), streaming of text and of a
tool call, and a cancel (closing the stream aborts the upstream call).

No network beyond loopback: LangSmith tracing is off (the variables below), and tiktoken is
fenced. ChatOpenAI needs a tokenizer only to count tokens (`get_num_tokens*`,
`get_token_ids`), never to invoke or stream; tiktoken would download its encodings from
openaipublic.blob.core.windows.net on first use, so `no_tokenizer_downloads` makes any
such download fail the test at once (docs/providers.md)."""

from __future__ import annotations

import json
import os
import uuid

import langchain_openai
import pydantic
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool

from sim import formats
from tests.support import get_json, wait_until

pytestmark = pytest.mark.integration

NO_TRACING = {"LANGCHAIN_TRACING_V2": "false", "LANGSMITH_TRACING": "false", "LANGSMITH_API_KEY": ""}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """LangSmith off; tiktoken may read no encoding from anywhere (its empty cache, and
    `read_file`, the one place it fetches a URL, refuses)."""
    import tiktoken.load

    def refuse(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {blobpath}: these tests must need no tokenizer")

    with pytest.MonkeyPatch.context() as mp:
        for name, value in NO_TRACING.items():
            mp.setenv(name, value)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        mp.setattr(tiktoken.load, "read_file", refuse)
        yield


@pytest.fixture(scope="module")
def llm(gateway):
    return langchain_openai.ChatOpenAI(
        model="sim-1", base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20
    )


def unique(directive: str = "tokens=4") -> str:
    return f"langchain {uuid.uuid4().hex[:10]}\n#sim {directive}"


def sim_calls(gateway, text: str) -> list[dict]:
    marker = text.split("\n")[0]
    return [r for r in get_json(gateway.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


@tool
def get_weather(city: str) -> str:
    """Weather by city."""
    return f"18C and clear in {city}"


class Weather(pydantic.BaseModel):
    """The weather in a city."""

    city: str
    celsius: int
    sunny: bool


def test_structured_output_by_json_schema(llm, gateway):
    text = unique()
    answer = llm.with_structured_output(Weather, method="json_schema").invoke(text)
    assert answer == Weather(city="sim", celsius=1, sunny=True)
    [call] = sim_calls(gateway, text)
    fmt = call["body"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Weather"
    assert set(fmt["json_schema"]["schema"]["properties"]) == {"city", "celsius", "sunny"}


def test_structured_output_by_function_calling(llm, gateway):
    text = unique()  # no directive: the forced tool_choice alone makes the model call the tool
    answer = llm.with_structured_output(Weather, method="function_calling").invoke(text)
    assert answer == Weather(city="sim", celsius=1, sunny=True)
    [call] = sim_calls(gateway, text)
    body = call["body"]
    assert [t["function"]["name"] for t in body["tools"]] == ["Weather"]
    assert body["tool_choice"]["function"]["name"] == "Weather"


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_with_bind_tools(llm, gateway, stream):
    text = unique("reply=tool_call tokens=3")
    chat = llm.bind_tools([get_weather])

    def ask(messages):
        if not stream:
            return chat.invoke(messages)
        chunks = list(chat.stream(messages))
        whole = chunks[0]
        for chunk in chunks[1:]:
            whole += chunk
        return whole

    messages: list = [HumanMessage(text)]
    first = ask(messages)
    [call] = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "sim"} and call["id"].startswith("call_sim")
    messages += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = ask(messages)
    assert not final.tool_calls and final.content
    assert final.response_metadata["finish_reason"] == "stop"

    first_body, second_body = (c["body"] for c in sim_calls(gateway, text))
    assert first_body["tools"][0]["function"]["name"] == "get_weather"
    assistant, result = second_body["messages"][1:]
    assert assistant["role"] == "assistant" and assistant["content"] in (None, "")
    [sent] = assistant["tool_calls"]
    assert sent["id"] == call["id"] and sent["function"]["name"] == "get_weather"
    assert json.loads(sent["function"]["arguments"]) == {"city": "sim"}
    assert result == {"role": "tool", "tool_call_id": call["id"], "content": "18C and clear in sim"}


def test_streaming_text(llm):
    text = unique("tokens=6")
    chunks = list(llm.stream(text))
    pieces = [c.content for c in chunks if c.content]
    assert len(pieces) == 6
    assert "".join(pieces) == "".join(formats.make_tokens([{"role": "user", "content": text}], 6))
    assert [c.response_metadata.get("finish_reason") for c in chunks if c.response_metadata.get("finish_reason")] == [
        "stop"
    ]


def test_a_streamed_tool_call_arrives_in_pieces(llm):
    text = unique("reply=tool_call tokens=5")
    chunks: list[AIMessageChunk] = list(llm.bind_tools([get_weather]).stream(text))
    pieces = [piece for c in chunks for piece in c.tool_call_chunks]
    # the first piece names the call, the later ones carry only argument fragments
    assert pieces[0]["name"] == "get_weather" and pieces[0]["id"].startswith("call_sim")
    assert len([p for p in pieces if p["args"]]) > 1 and all(p["name"] is None for p in pieces[1:])
    assert json.loads("".join(p["args"] or "" for p in pieces)) == {"city": "sim"}


def test_closing_the_stream_aborts_the_upstream_call(llm, gateway):
    text = unique("tokens=500 token_interval_ms=20")
    stream = llm.stream(text)
    received = ""
    for chunk in stream:
        received += chunk.content
        if len(received.split()) >= 2:
            break
    stream.close()
    ids = {c["call_id"] for c in sim_calls(gateway, text)}

    def cancelled():
        return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]

    observed = wait_until(cancelled, timeout=5, message="the sim to see the call cancelled")
    assert observed[0]["tokens_sent"] < 500


def test_no_network_was_needed():
    """The fence above is in place (a tokenizer download would have failed a test)."""
    import tiktoken.load

    assert os.environ["LANGCHAIN_TRACING_V2"] == "false"
    with pytest.raises(AssertionError, match="must need no tokenizer"):
        tiktoken.load.read_file("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken")
