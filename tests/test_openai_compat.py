"""The OpenAI-compatible endpoint (edge/openai_compat.py) driven by the official `openai`
SDK against the real running gateway (`gateway` fixture: run.py in front of the simulated
provider), plus a few raw-HTTP checks of the wire format the SDK hides."""

from __future__ import annotations

import json
import time
import uuid

import openai
import pytest

from sim import formats
from tests.support import SSEClient, get_json, request, running_gateway, wait_until

pytestmark = pytest.mark.integration


def client_for(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def client(gateway):
    with client_for(gateway) as c:
        yield c


def unique(directive: str) -> str:
    return f"compat {uuid.uuid4().hex[:10]}\n#sim {directive}"


def expected(text: str, n: int) -> str:
    return "".join(formats.make_tokens([{"role": "user", "content": text}], n))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def sim_calls(gateway, text: str) -> list[dict]:
    marker = text.split("\n")[0]
    return [r for r in get_json(gateway.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


# --- answers ------------------------------------------------------------------------------------


def test_streaming_with_usage(client, gateway):
    text = unique("tokens=6")
    stream = client.chat.completions.create(
        model="sim-1", messages=user(text), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected(text, 6)
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and chunks[0].model == "sim-1"
    assert sim_calls(gateway, text)[0]["body"]["model"] == "sim-1"


def test_non_streaming(client):
    text = unique("tokens=5")
    completion = client.chat.completions.create(model="sim-1", messages=user(text))
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected(text, 5)
    assert choice.finish_reason == "stop"
    assert completion.usage.completion_tokens == 5 and completion.usage.total_tokens >= 5


def test_openai_message_shapes_are_accepted(client):
    text = unique("tokens=3")
    completion = client.chat.completions.create(
        model="sim-1",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": text}]},
        ],
        max_completion_tokens=50,
    )
    # forwarded as they came (docs/providers.md "Fidelity"): the simulated provider answers from them
    conversation = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": text}]},
    ]
    assert completion.choices[0].message.content == "".join(formats.make_tokens(conversation, 3))


def test_provider_prefix_picks_provider_and_model(client, gateway):
    text = unique("tokens=2")
    completion = client.chat.completions.create(model="simulated/custom-model", messages=user(text))
    assert completion.model == "simulated/custom-model"
    assert sim_calls(gateway, text)[0]["body"]["model"] == "custom-model"


def test_raw_stream_is_pure_openai_sse(gateway):
    """No sluice `event:` frames; comments for keepalive; [DONE] last."""
    client = SSEClient(
        gateway.url + "/v1/chat/completions", {"model": "sim-1", "stream": True, "messages": user(unique("tokens=3"))}
    )
    try:
        raw = client.body()
    finally:
        client.close()
    assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
    assert raw.startswith(b": ping\n\n") and raw.endswith(b"data: [DONE]\n\n")
    assert b"event:" not in raw and b'"type"' not in raw
    frames = [f for f in raw.split(b"\n\n") if f.startswith(b"data: {")]
    assert all(json.loads(f[6:])["id"] == "chatcmpl-" + client.headers["x-request-id"] for f in frames)


# --- cancellation -------------------------------------------------------------------------------


def test_closing_the_stream_early_cancels_the_upstream_call(client, gateway):
    text = unique("tokens=500 token_interval_ms=20")
    stream = client.chat.completions.create(model="sim-1", messages=user(text), stream=True)
    received = ""
    for chunk in stream:
        received += chunk.choices[0].delta.content or ""
        if len(received.split()) >= 2:
            break
    stream.close()

    def cancelled():
        ids = {r["call_id"] for r in sim_calls(gateway, text)}
        return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]

    observed = wait_until(cancelled, timeout=5, message="the sim to see the upstream call cancelled")
    assert observed[0]["tokens_sent"] < 500


def test_a_non_streaming_client_that_gives_up_cancels_the_upstream_call(gateway):
    text = unique("tokens=500 token_interval_ms=20")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=0.5) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="sim-1", messages=user(text))

    def cancelled():
        ids = {r["call_id"] for r in sim_calls(gateway, text)}
        return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]

    observed = wait_until(cancelled, timeout=5, message="the sim to see the upstream call cancelled")
    assert observed[0]["tokens_sent"] < 500


# --- errors -------------------------------------------------------------------------------------


def test_invalid_requests_are_openai_errors(client, gateway):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": 5}])
    assert info.value.status_code == 422 and "messages[0].content" in info.value.message
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] is None
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="sim-1", messages=[])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="sim-1", messages=user("x"), n=0)
    with pytest.raises(openai.BadRequestError) as info:  # a provider that is not configured
        client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=user("x"))
    assert info.value.code == "provider_not_configured"

    url = gateway.url + "/v1/chat/completions"
    for body, headers, status in (
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"x" * (1024 * 1024 + 10), {"content-type": "application/json"}, 413),
        (b"{}", {"content-type": "text/plain"}, 415),
    ):
        got, _, raw = request("POST", url, body, headers)
        error = json.loads(raw)["error"]
        assert got == status and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("field", ["embeddings", "count_tokens"])
def test_a_chat_body_cannot_turn_into_another_kind_of_call(gateway, field):
    """Probed: a chat body carrying the normalized body's marker of an embeddings or count
    call was sent upstream as that call and answered 200 with empty content."""
    text = unique("tokens=3")
    body = {"model": "sim-1", "messages": user(text), field: {"input": text, "messages": user(text)}}
    status, _, raw = request("POST", gateway.url + "/v1/chat/completions", body, {"content-type": "application/json"})
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == "unsupported_parameter" and field in error["message"]
    status, _, raw = request("POST", gateway.url + "/api/chat", body, {"content-type": "application/json"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "unsupported_parameter"
    assert sim_calls(gateway, text) == []  # nothing went upstream


def test_upstream_errors(client):
    # Streaming: the failure arrives after the 200, as OpenAI's in-band error frame.
    with pytest.raises(openai.APIError) as info:
        list(client.chat.completions.create(model="sim-1", messages=user(unique("fail=500")), stream=True))
    assert info.value.body["code"] == "upstream_5xx"
    # Non-streaming: an HTTP error status.
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="sim-1", messages=user(unique("fail=500")))
    assert info.value.status_code == 502 and info.value.code == "upstream_5xx"
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="sim-1", messages=user(unique("fail=429 retry_after_s=0.01")))
    assert info.value.code == "upstream_429"


def test_reset_mid_stream_gives_content_then_an_error(client):
    text = unique("fail=reset_mid fail_after_tokens=2 tokens=6")
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="sim-1", messages=user(text), stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "".join(formats.make_tokens([{"role": "user", "content": text}], 6)[:2])
    assert info.value.body["code"] == "upstream_reset"


def test_mid_stream_error_frame_has_no_done_after_it(gateway):
    client = SSEClient(
        gateway.url + "/v1/chat/completions",
        {"model": "sim-1", "stream": True, "messages": user(unique("fail=error_mid fail_after_tokens=1"))},
    )
    try:
        raw = client.body()
    finally:
        client.close()
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert json.loads(last[len(b"data: ") :])["error"]["code"] == "upstream_5xx"
    assert b"[DONE]" not in raw


# --- models -------------------------------------------------------------------------------------


def test_models(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "simulated/sim-1" in ids and all(m.object == "model" for m in models.data)
    assert client.models.retrieve("simulated/sim-1").owned_by == "simulated"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope/nothing")


# --- the pacer says no --------------------------------------------------------------------------


def test_pacer_rejection_is_a_429_with_retry_after(sim):
    env = {"SIMULATED_BASE_URL": sim, "SIMULATED_CONCURRENCY": "1", "PACER_MAX_QUEUE": "0"}
    with running_gateway(env) as gw, client_for(gw) as client:
        stream = client.chat.completions.create(model="sim-1", messages=user(unique("fail=stall")), stream=True)
        try:
            next(iter(stream))  # the only upstream slot is now taken
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="sim-1", messages=user(unique("tokens=1")))
            assert time.monotonic() - started < 5
            assert info.value.code == "pacer_queue_full"
            assert int(info.value.response.headers["retry-after"]) >= 1
        finally:
            stream.close()
