"""POST /v1/embeddings (edge/embeddings.py) with the official `openai` SDK against the real
gateway and the simulated provider: answers, errors, coalescing (identical requests in
flight share one upstream call), cancel, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import uuid

import openai
import pytest

from sim import formats
from tests.support import get_json, request, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


def unique(directive: str = "") -> str:
    return f"embed {uuid.uuid4().hex[:10]}" + (f"\n#sim {directive}" if directive else "")


def sim_calls(gateway, text: str) -> list[dict]:
    marker = text.split("\n")[0]
    return [r for r in get_json(gateway.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def test_embeddings_create_floats_and_base64(client, gateway):
    texts = [unique(), unique()]
    result = client.embeddings.create(model="simulated/sim-embed", input=texts)  # the SDK asks for base64
    assert result.object == "list" and result.model == "simulated/sim-embed"
    assert [d.index for d in result.data] == [0, 1]
    assert [d.embedding for d in result.data] == [formats.embedding(t) for t in texts]
    assert result.usage.prompt_tokens == result.usage.total_tokens == 4
    upstream = sim_calls(gateway, texts[0])[0]
    assert upstream["path"] == "/v1/embeddings" and upstream["body"]["model"] == "sim-embed"
    floats = client.embeddings.create(
        model="simulated/sim-embed", input=texts[0], encoding_format="float", dimensions=4
    )
    assert floats.data[0].embedding == formats.embedding(texts[0], 4)


def test_every_field_reaches_the_provider(client, gateway):
    text = unique()
    client.embeddings.create(
        model="simulated/sim-embed", input=text, user="user-1", extra_body={"truncate": True, "coalesce": True}
    )
    [upstream] = sim_calls(gateway, text)
    assert upstream["body"] == {
        "model": "sim-embed",
        "input": text,
        "encoding_format": "base64",
        "user": "user-1",
        "truncate": True,  # a server's own field (Ollama's), as it came; sluice's `coalesce` is not sent
    }


def test_bad_requests_are_openai_errors(client, gateway):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.embeddings.create(model="sim-embed", input=[])
    assert info.value.body["type"] == "invalid_request_error" and "'input'" in info.value.message
    status, _, body = request("POST", gateway.url + "/v1/embeddings", {"input": "x"})
    assert status == 422 and json.loads(body)["error"]["code"] == "invalid_request"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="anthropic/claude", input="x")
    assert info.value.status_code == 400


def test_an_upstream_failure_is_an_error(client):
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="sim-embed", input=unique("fail=429 retry_after_s=none"))
    assert info.value.body["code"] == "upstream_429"


def test_ten_identical_concurrent_requests_make_one_upstream_call(client, gateway):
    text = unique("ttft_ms=600")
    perf = gateway.url + "/api/metrics/performance?last_n=100000"
    before = get_json(perf)[1]["coalesce"]["followers"]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: client.embeddings.create(model="sim-embed", input=text), range(10)))
    assert {tuple(r.data[0].embedding) for r in results} == {tuple(formats.embedding(text))}
    assert len(sim_calls(gateway, text)) == 1
    wait_until(
        lambda: get_json(perf)[1]["coalesce"]["followers"] >= before + 9,
        timeout=10,
        message="the followers in /api/metrics/performance",
    )


def test_a_client_that_gives_up_cancels_the_upstream_call(gateway):
    text = unique("ttft_ms=5000")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=0.5) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.embeddings.create(model="sim-embed", input=text)

    def cancelled():
        ids = {r["call_id"] for r in sim_calls(gateway, text)}
        return [c for c in get_json(gateway.sim + "/stats")[1]["cancellations"] if c["call_id"] in ids]

    wait_until(cancelled, timeout=5, message="the sim to see the embeddings call cancelled")
