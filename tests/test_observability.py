"""Operators' view through the whole gateway (issue 18): `/metrics` and the performance
report after streams to two providers and two models.

One gateway, two providers (sluice's `simulated` and its `openai`, both pointed at the one
simulated provider), two model names each. Checked: every per-request family carries the
provider and model labels; the token counters equal the usage the provider reported;
added TTFT = client TTFT - provider TTFT; the provider's TTFT is at least the delay the
simulated provider was told to take.
"""

from __future__ import annotations

import json
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import data_events, get_json, request, running_gateway, stream_chat, wait_until

pytestmark = pytest.mark.integration

PROVIDERS = ("simulated", "openai")
MODELS = ("m-alpha", "m-beta")
SIM_TTFT_MS = 120
PER_PAIR = 2
LABELLED = (
    "sluice_ttft_seconds",
    "sluice_provider_ttft_seconds",
    "sluice_added_ttft_seconds",
    "sluice_queue_wait_seconds",
    "sluice_request_duration_seconds",
    "sluice_requests",
    "sluice_upstream_calls",
    "sluice_upstream_tokens",
    "sluice_coalesce_leaders",
    "sluice_coalesce_followers",
    "sluice_upstream_calls_saved",
)


@pytest.fixture(scope="module")
def streamed(sim):
    env = {"SIMULATED_BASE_URL": sim, "OPENAI_BASE_URL": sim, "OPENAI_API_KEY": "test-key-observe", "OPENAI_H2C": "0"}
    for account in ("SIMULATED", "OPENAI"):
        env.update(
            {f"{account}_RPS": "100", f"{account}_BURST": "100", f"{account}_CONCURRENCY": "50", f"{account}_RPM": "0"}
        )
    with running_gateway(env) as gw:
        usage: dict[tuple[str, str], dict[str, int]] = {}
        for provider in PROVIDERS:
            for model in MODELS:
                for i in range(PER_PAIR):
                    text = f"{provider} {model} {uuid.uuid4().hex}\n#sim tokens={3 + i} ttft_ms={SIM_TTFT_MS}"
                    status, _, events = stream_chat(
                        gw.url + "/api/chat",
                        {"provider": provider, "model": model, "messages": [{"role": "user", "content": text}]},
                    )
                    assert status == 200, events
                    done = data_events(events)[-1]
                    assert done["type"] == "done", done
                    got = usage.setdefault((provider, model), {"input": 0, "output": 0})
                    got["input"] += done["usage"]["prompt_tokens"]
                    got["output"] += done["usage"]["completion_tokens"]
        calls = len(PROVIDERS) * len(MODELS) * PER_PAIR

        def families():
            status, _, raw = request("GET", gw.url + "/metrics")
            assert status == 200
            return {f.name: f for f in text_string_to_metric_families(raw.decode())}

        # the Pool's upstream records reach the Metrics actor on its own flush timer
        wait_until(
            lambda: sum(s.value for s in families()["sluice_upstream_calls"].samples) >= calls,
            timeout=20,
            message="the Pool's upstream records",
        )
        performance = get_json(gw.url + "/api/metrics/performance?last_n=100")[1]
        yield families(), usage, performance


def total(fams, family: str, sample: str, **labels) -> float:
    return sum(s.value for s in fams[family].samples if s.name == sample and labels.items() <= s.labels.items())


def test_every_family_has_provider_and_model_labels(streamed):
    fams, _, _ = streamed
    for family in LABELLED:
        samples = fams[family].samples
        assert samples, family
        pairs = {(s.labels.get("provider"), s.labels.get("model")) for s in samples}
        assert pairs == {(p, m) for p in PROVIDERS for m in MODELS}, (family, pairs)
    for provider in PROVIDERS:
        for model in MODELS:
            assert (
                total(
                    fams,
                    "sluice_requests",
                    "sluice_requests_total",
                    provider=provider,
                    model=model,
                    outcome="done",
                    role="leader",
                )
                == PER_PAIR
            )


def test_token_counters_equal_the_providers_usage(streamed):
    fams, usage, _ = streamed
    for (provider, model), want in usage.items():
        for token_type in ("input", "output"):
            got = total(
                fams,
                "sluice_upstream_tokens",
                "sluice_upstream_tokens_total",
                provider=provider,
                model=model,
                token_type=token_type,
            )
            assert got == want[token_type], (provider, model, token_type)
        assert want["output"] == sum(3 + i for i in range(PER_PAIR))  # the sim's tokens= directive


def test_added_ttft_is_client_minus_provider(streamed):
    fams, _, performance = streamed
    for provider in PROVIDERS:
        for model in MODELS:
            labels = {"provider": provider, "model": model}
            client = total(fams, "sluice_ttft_seconds", "sluice_ttft_seconds_sum", **labels)
            upstream = total(fams, "sluice_provider_ttft_seconds", "sluice_provider_ttft_seconds_sum", **labels)
            added = total(fams, "sluice_added_ttft_seconds", "sluice_added_ttft_seconds_sum", **labels)
            assert total(fams, "sluice_added_ttft_seconds", "sluice_added_ttft_seconds_count", **labels) == PER_PAIR
            assert added == pytest.approx(client - upstream, abs=0.001 * PER_PAIR)
            # the provider's share was measured, not lost: the sim held its first byte back
            assert upstream >= PER_PAIR * SIM_TTFT_MS / 1000.0 * 0.9
            assert 0 <= added < client
    by = {(g["provider"], g["model"]): g for g in performance["by_provider"]}
    assert set(by) == {(p, m) for p in PROVIDERS for m in MODELS}
    for group in by.values():
        assert group["requests"] == PER_PAIR and group["added_ttft_ms"]["count"] == PER_PAIR
        assert group["provider_ttft_ms"]["p50"] >= SIM_TTFT_MS * 0.9
    # the sign-off's keys are all still there
    assert {"ttft_ms", "queue_wait_ms", "cancel_ms", "error_rate", "coalesce", "upstream_calls"} <= set(performance)
    assert json.dumps(performance)  # plain JSON
