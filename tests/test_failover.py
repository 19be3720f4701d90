"""Several API keys per account, circuit breakers and fallbacks through the whole gateway
(real run.py, real actors, the simulated provider over HTTP/2).

The simulated provider tells keys apart by their Authorization (or x-api-key) header and
fails only the keys named in its `fail_keys` knob. One gateway, four accounts on one sim:

  SIMULATED   keys key-a, key-b; falls back to OPENAI (key-c)
  ANTHROPIC   keys key-d, key-e; no fallback (fails fast when both are open)
  PERPLEXITY  keys key-p1, key-p2 at RPS=1 BURST=1 each (each key its own budget)
"""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import data_events, request, running_gateway, running_sim, stream_chat, wait_until

pytestmark = pytest.mark.integration

TOKEN = "failover-test-admin-token"
OPEN_S = 3.0


@pytest.fixture(scope="module")
def gw():
    with running_sim() as sim:
        env = {
            "SLUICE_ADMIN_TOKEN": TOKEN,
            "CIRCUIT_FAILURES": "2",
            "CIRCUIT_OPEN_S": str(OPEN_S),
            "CIRCUIT_MAX_OPEN_S": str(OPEN_S),
            "SIMULATED_BASE_URL": sim,
            "SIMULATED_API_KEYS": "key-a,key-b",
            "SIMULATED_FALLBACK": "openai",
            "OPENAI_BASE_URL": sim,
            "OPENAI_API_KEY": "key-c",
            "OPENAI_H2C": "1",
            "ANTHROPIC_BASE_URL": sim,
            "ANTHROPIC_API_KEYS": "key-d,key-e",
            "ANTHROPIC_H2C": "1",
            "PERPLEXITY_BASE_URL": sim,
            "PERPLEXITY_API_KEYS": "key-p1,key-p2",
            "PERPLEXITY_H2C": "1",
            "PERPLEXITY_RPS": "1",
            "PERPLEXITY_BURST": "1",
            "PERPLEXITY_RPM": "0",
            "PERPLEXITY_CONCURRENCY": "10",
        }
        with running_gateway(env) as gateway:
            gateway.sim = sim
            yield gateway


@pytest.fixture(autouse=True)
def healthy_sim(gw):
    sim_config(gw, fail="none", fail_keys="")
    yield
    sim_config(gw, fail="none", fail_keys="")


# --- helpers ------------------------------------------------------------------------------


def sim_config(gw, **knobs) -> None:
    status, _, _ = request("POST", gw.sim + "/config", knobs)
    assert status == 200


def chat(gw, text: str, provider: str = "simulated"):
    body = {"provider": provider, "messages": [{"role": "user", "content": text}]}
    return stream_chat(gw.url + "/api/chat", body)


def served(gw, text: str, provider: str = "simulated") -> dict:
    """Stream one chat; it must succeed. Its meta event."""
    status, _, events = chat(gw, text, provider)
    assert status == 200, events
    data = data_events(events)
    assert data[-1]["type"] == "done", data
    return next(d for d in data if d["type"] == "meta")


def pacer(gw, account: str) -> dict:
    status, _, raw = request(
        "GET", gw.url + f"/api/admin/state?role=pacer:{account}", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, raw
    return json.loads(raw)["results"][f"pacer:{account}"]


def circuits(gw, account: str) -> list[str]:
    return [k["circuit"] for k in pacer(gw, account)["keys"]]


def metric(gw, name: str, **labels) -> float | None:
    status, _, raw = request("GET", gw.url + "/metrics")
    assert status == 200
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in raw.decode().splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


# --- tests --------------------------------------------------------------------------------


def test_a_failing_key_is_routed_around_its_circuit_opens_and_a_probe_closes_it(gw):
    sim_config(gw, fail="500", fail_keys="key-a")
    metas = [served(gw, unique("one key down")) for _ in range(6)]
    # Every request succeeds, on key #2: a call granted on #1 retries on #2 at once.
    assert {m["key"] for m in metas} == {"#2"}
    assert any(m["attempts"] == 2 for m in metas)
    assert circuits(gw, "simulated")[0] in ("open", "half_open")
    wait_until(
        lambda: metric(gw, "sluice_circuit_opens_total", account="simulated", key="#1") == 1,
        timeout=10,
        message="the open circuit counted in /metrics",
    )
    assert metric(gw, "sluice_circuit_state", account="simulated", key="#2") == 0
    # Key #1 recovers; after the cool-down one probe goes to it and closes the circuit.
    sim_config(gw, fail="none", fail_keys="")
    wait_until(
        lambda: served(gw, unique("probe")) and circuits(gw, "simulated")[0] == "closed",
        timeout=OPEN_S + 20,
        interval=0.2,
        message="the circuit of key #1 closed again",
    )
    assert metric(gw, "sluice_circuit_state", account="simulated", key="#1") == 0
    # Both keys serve again.
    assert {served(gw, unique("both"))["key"] for _ in range(4)} == {"#1", "#2"}
    log = gw.output()
    assert re.search(r"circuit open: account=simulated key=#1", log)
    assert re.search(r"circuit half-open: account=simulated key=#1", log)
    assert re.search(r"circuit closed: account=simulated key=#1", log)
    assert "key-a" not in log and "key-b" not in log


def open_both(gw, provider: str, account: str) -> None:
    """Fail requests until every key's circuit of the account is open (they are the calls
    that open it: each tried both keys), and the lease slices they earned are back: a
    circuit's change recalls them, and until a shard has given its grants back it may
    open one more call on the key, like a request granted just before the circuit opened
    (docs/reliability.md, "Fallbacks and circuit breakers")."""

    def opened() -> bool:
        state = pacer(gw, account)
        return [k["circuit"] for k in state["keys"]] == ["open", "open"] and state["held"] == 0

    def all_open() -> bool:
        if opened():
            return True
        chat(gw, unique("opening"), provider)
        return opened()

    wait_until(all_open, timeout=20, interval=0.05, message=f"both circuits of {account} open")


def test_every_key_failing_goes_to_the_fallback_with_fallback_from_in_meta(gw):
    sim_config(gw, fail="500", fail_keys="key-a,key-b")
    open_both(gw, "simulated", "simulated")
    before = metric(gw, "sluice_fallbacks_total", **{"from": "simulated", "to": "openai"}) or 0
    same = unique("same question")
    texts = [same] * 5 + [unique("distinct") for _ in range(3)]
    with ThreadPoolExecutor(len(texts)) as pool:
        metas = list(pool.map(lambda t: served(gw, t), texts))
    for meta in metas:
        assert (meta["provider"], meta["model"], meta["fallback_from"]) == ("openai", "gpt-4o-mini", "simulated")
    # The five identical requests shared one call (coalesced on the original key).
    assert len({m["stream_id"] for m in metas[:5]}) == 1
    wait_until(
        lambda: (metric(gw, "sluice_fallbacks_total", **{"from": "simulated", "to": "openai"}) or 0) >= before + 4,
        timeout=10,
        message="fallbacks counted in /metrics",
    )
    assert metric(gw, "sluice_circuit_state", account="simulated", key="#1") in (1, 2)
    assert re.search(r"fallback: from=simulated to=openai/gpt-4o-mini reason=circuits_open", gw.output())


def test_every_key_failing_without_a_fallback_fails_fast_with_503_and_retry_after(gw):
    sim_config(gw, fail="500", fail_keys="key-d,key-e")
    open_both(gw, "anthropic", "anthropic")
    started = time.monotonic()
    status, headers, body = chat(gw, unique("no fallback"), "anthropic")
    took = time.monotonic() - started
    assert status == 503, body
    assert body["error"]["code"] == "upstream_unavailable"
    assert 1 <= int(headers["retry-after"]) <= OPEN_S + 1
    assert took < 5  # not a hang: answered without waiting for any upstream
    assert pacer(gw, "anthropic")["queue_depth"] == 0


def test_each_key_has_its_own_pacer_budget(gw):
    # RPS=1 BURST=1 per key, two keys: the calls go out two by two, a second apart.
    texts = [unique("budget") for _ in range(6)]
    with ThreadPoolExecutor(len(texts)) as pool:
        metas = list(pool.map(lambda t: served(gw, t, "perplexity"), texts))
    assert sorted(m["key"] for m in metas) == ["#1"] * 3 + ["#2"] * 3
    calls = [
        r
        for r in json.loads(request("GET", gw.sim + "/stats")[2])["requests"]
        if any(t in json.dumps(r["body"]) for t in texts)
    ]
    starts = sorted(r["started_at"] for r in calls)
    assert len(starts) == 6
    # Never three calls within a second: each key grants one per second (a little slack
    # for the clocks of two processes).
    assert all(starts[i + 2] - starts[i] >= 0.9 for i in range(4)), starts
    state = pacer(gw, "perplexity")
    assert [k["key"] for k in state["keys"]] == ["#1", "#2"]
