"""Every provider through the whole gateway: real run.py, real actors, real upstream HTTP.

One gateway is started with every provider pointed at the one simulated provider, which
answers each API in its own wire format (sim/formats.py). Anthropic and Perplexity (Agent
and Sonar) are reached over prior-knowledge HTTP/2, OpenAI (chat and Responses) and Ollama
over HTTP/1.1, so both transports are exercised. For each provider: a whole answer
(ping, meta, the sim's tokens as deltas, exactly one done), upstream 500/429 and an in-band
error as in-band error events with the right code, and a reset mid-stream as deltas then
an error. The API keys must reach the sim in each API's own auth header, and never appear
in the gateway's log or in anything a client receives.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from sim import formats
from tests.support import data_events, get_json, request, running_gateway, stream_chat

pytestmark = pytest.mark.integration

PROVIDERS = ["openai", "openai_responses", "anthropic", "perplexity", "perplexity_sonar", "ollama"]
PATHS = {
    "openai": "/v1/chat/completions",
    "openai_responses": "/v1/responses",
    "anthropic": "/v1/messages",
    "perplexity": "/v1/agent",
    "perplexity_sonar": "/chat/completions",
    "ollama": "/api/chat",
}
ACCOUNTS = {
    "openai": "OPENAI",
    "openai_responses": "OPENAI",
    "anthropic": "ANTHROPIC",
    "perplexity": "PERPLEXITY",
    "perplexity_sonar": "PERPLEXITY",
    "ollama": "OLLAMA",
}
H2C = {"OPENAI": False, "ANTHROPIC": True, "PERPLEXITY": True, "OLLAMA": False}
# A fresh secret per run, so finding it anywhere is a leak and not a coincidence.
KEYS = {account: f"test-key-{account.lower()}-{uuid.uuid4().hex}" for account in H2C}
AUTH = {"anthropic": ["x-api-key"]}  # the others send "Authorization: Bearer <key>"
IN_BAND_CODE = {"ollama": "upstream_error"}  # Ollama's error line carries no kind

received: list[bytes] = []  # every body a client got from the gateway in this module


@pytest.fixture(scope="module")
def gw(sim):
    env = {"SIMULATED_BASE_URL": sim, "SLUICE_LOG_LEVEL": "INFO"}
    for account, h2c in H2C.items():
        env.update(
            {
                f"{account}_BASE_URL": sim,
                f"{account}_API_KEY": KEYS[account],
                f"{account}_H2C": "1" if h2c else "0",
                # Room for this module's calls: production pacing would make it wait for minutes.
                f"{account}_RPS": "100",
                f"{account}_BURST": "100",
                f"{account}_CONCURRENCY": "50",
                f"{account}_RPM": "0",
            }
        )
    with running_gateway(env) as gateway:
        gateway.sim = sim
        yield gateway


def chat(gw, provider: str, text: str):
    status, headers, events = stream_chat(
        gw.url + "/api/chat", {"provider": provider, "messages": [{"role": "user", "content": text}]}
    )
    received.append(json.dumps(events).encode())
    assert status == 200, events
    return headers, events


def unique(provider: str, directive: str) -> str:
    return f"{provider} {uuid.uuid4().hex[:10]}\n#sim {directive}"


def sim_calls(gw, text: str) -> list[dict]:
    marker = text.split("\n")[0]  # the unique first line (JSON escapes the newline after it)
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def terminal(data: list[dict]) -> list[dict]:
    return [d for d in data if d["type"] in ("done", "error")]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_whole_answer(gw, provider):
    text = unique(provider, "tokens=5 ttft_ms=20 token_interval_ms=2")
    headers, events = chat(gw, provider, text)
    assert events[0][0] == "ping"
    data = data_events(events)
    assert data[0]["type"] == "meta" and data[0]["provider"] == provider and data[0]["ttft_ms"] > 0
    assert data[0]["request_id"] == headers["x-request-id"]
    tokens = formats.make_tokens([{"role": "user", "content": text}], 5)
    assert [d["delta"] for d in data if d["type"] == "delta"] == tokens
    assert terminal(data) == [data[-1]] and data[-1]["type"] == "done" and data[-1]["finish_reason"] == "stop"
    usage = [d["usage"] for d in data if d["type"] == "usage"]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 5

    (call,) = sim_calls(gw, text)
    assert call["path"] == PATHS[provider] and call["outcome"] == "completed"
    assert call["protocol"] == ("h2" if H2C[ACCOUNTS[provider]] else "http/1.1")
    assert call["auth"] == AUTH.get(provider, ["authorization: Bearer"])


# A Sonar stream ends without [DONE] (as Perplexity does), so its usage comes out of the
# adapter's close(): the done event must carry it all the same.
@pytest.mark.parametrize("provider", PROVIDERS)
def test_done_carries_the_usage(gw, provider):
    _, events = chat(gw, provider, unique(provider, "tokens=3 ttft_ms=0 token_interval_ms=0"))
    done = data_events(events)[-1]
    assert done["type"] == "done" and done["usage"] is not None and done["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_upstream_http_errors_are_in_band_error_events(gw, provider):
    for directive, code in (("fail=500", "upstream_5xx"), ("fail=429 retry_after_s=0.01", "upstream_429")):
        _, events = chat(gw, provider, unique(provider, directive))
        assert events[0][0] == "ping"
        data = data_events(events)
        assert terminal(data) == [data[-1]] and data[-1]["type"] == "error"
        assert data[-1]["code"] == code and "simulated" in data[-1]["message"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_in_band_provider_error_after_some_deltas(gw, provider):
    _, events = chat(gw, provider, unique(provider, "fail=error_mid fail_after_tokens=2 tokens=6 token_interval_ms=1"))
    data = data_events(events)
    assert [d["type"] for d in data if d["type"] == "delta"] == ["delta", "delta"]
    assert terminal(data) == [data[-1]] and data[-1]["code"] == IN_BAND_CODE.get(provider, "upstream_5xx")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reset_mid_stream_gives_deltas_then_an_error(gw, provider):
    text = unique(provider, "fail=reset_mid fail_after_tokens=2 tokens=6 token_interval_ms=1")
    _, events = chat(gw, provider, text)
    data = data_events(events)
    assert [d["type"] for d in data].count("delta") == 2
    assert terminal(data) == [data[-1]] and data[-1]["code"] == "upstream_reset"
    assert sim_calls(gw, text)[0]["outcome"] == "aborted"


def test_api_keys_never_leak(gw):
    """Run last in this module: by then every provider has answered, failed and been reset."""
    for provider in PROVIDERS:
        chat(gw, provider, unique(provider, "fail=500"))
    for body in (
        {"provider": "anthropic", "messages": []},
        {"provider": "nope", "messages": [{"role": "user", "content": "x"}]},
    ):
        status, _, raw = request("POST", gw.url + "/api/chat", body)
        assert status == 422
        received.append(raw)
    log = Path(gw.log_path).read_text(errors="replace")
    everything = b"\n".join(received).decode()
    stats = json.dumps(get_json(gw.sim + "/stats")[1])
    for key in KEYS.values():
        assert key not in log, "an API key is in the gateway's log"
        assert key not in everything, "an API key reached a client"
        assert key not in stats, "the sim recorded a credential value"


def test_api_keys_never_leak_even_at_debug_level(sim):
    """hpack logs every HTTP/2 header it encodes at DEBUG, x-api-key included: run.py must
    keep that logger quiet even when sluice itself logs at DEBUG."""
    key = f"test-key-debug-{uuid.uuid4().hex}"
    env = {
        "SIMULATED_BASE_URL": sim,
        "SLUICE_LOG_LEVEL": "DEBUG",
        "ANTHROPIC_BASE_URL": sim,
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_H2C": "1",
    }
    with running_gateway(env) as gateway:
        status, _, events = stream_chat(
            gateway.url + "/api/chat",
            {"provider": "anthropic", "messages": [{"role": "user", "content": "hi\n#sim tokens=1"}]},
        )
        assert status == 200 and data_events(events)[-1]["type"] == "done"
        log = Path(gateway.log_path).read_text(errors="replace")
    assert key not in log
