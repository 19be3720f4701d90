"""Upstream faults through the whole gateway (real run.py, real actors, the simulated
provider over HTTP/2): what fails before the first byte is retried and no client sees it;
what cannot be retried ends every client's stream with exactly one error event.

Each retryable fault is run as one burst of 41 clients at once: 1 client alone, 20
identical clients (one coalesced upstream call) and 20 distinct clients (20 calls). The
simulated provider fails the first call(s) of each body (`fail_times`) and records every
call, so the tests count upstream attempts per body. The retry budget is lifted here
(UPSTREAM_RETRY_MIN=1000): 22 calls all failing twice at once is just what the budget exists
to stop, and the budget has its own test (test_retry_policy.py). A ratio alone is not
enough: the budget's 10 s window can hold an earlier test's retries after its calls have
left it (a 429 is retried 1 s after its call), which left a later burst without retries.
A call may take 4 attempts here, one more than the worst burst's faults need: twice in CI
one body of the 500-twice burst answered `upstream_5xx`, an attempt having failed before
the provider saw it. The cause was found and fixed (httpcore's pool closed a connection it
took for idle under a starting request: patches/httpcore_h2_expiry.py); the burst test
still allows such an attempt on at most two bodies, and says which (its output, and its
failure message with the Pool's retry lines), as this box's rare transients are not all
known.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sim import formats
from tests.support import data_events, get_json, request, running_gateway, running_sim, stream_chat, wait_until

pytestmark = pytest.mark.integration

TOKEN = "retry-test-admin-token"
TOKENS = 6
MAX_ATTEMPTS = 4  # room for one transient failure beside a burst's two faults (the docstring)


@pytest.fixture(scope="module")
def gw():
    with running_sim() as sim:
        fast = {"RPS": "100", "BURST": "100", "CONCURRENCY": "60", "RPM": "0"}
        env = {
            "SIMULATED_BASE_URL": sim,
            "SLUICE_ADMIN_TOKEN": TOKEN,
            "UPSTREAM_RETRY_MIN": "1000",  # see the module's docstring
            "UPSTREAM_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "UPSTREAM_READ_TIMEOUT_S": "2",  # the stalled stream's deadline
            # Two more accounts on the same sim, each with its own connection pool and Pacer:
            # OPENAI keeps idle connections 0.3 s (below the sim's idle close), ANTHROPIC
            # takes a long Retry-After (its Pacer pauses; the others must not).
            "OPENAI_BASE_URL": sim,
            "OPENAI_API_KEY": "k",
            "OPENAI_H2C": "1",
            "OPENAI_KEEPALIVE_S": "0.3",
            "ANTHROPIC_BASE_URL": sim,
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_H2C": "1",
            **{f"{account}_{k}": v for account in ("OPENAI", "ANTHROPIC") for k, v in fast.items()},
        }
        with running_gateway(env) as gateway:
            gateway.sim = sim
            yield gateway
            # every test leaves the Pacers with nothing in flight and nothing queued
            for account in ("simulated", "openai", "anthropic"):
                wait_until(lambda: pacer_idle(gateway, account), timeout=20, message=f"pacer:{account} idle")


# --- helpers ------------------------------------------------------------------------------


def chat(gw, text: str, provider: str = "simulated", **extra) -> list[dict]:
    body = {"provider": provider, "messages": [{"role": "user", "content": text}], **extra}
    status, _, events = stream_chat(gw.url + "/api/chat", body)
    assert status == 200, events
    assert events[0][0] == "ping"
    return data_events(events)


def sim_calls(gw, marker: str) -> list[dict]:
    """The sim's records of the calls whose prompt holds `marker` (ends with ':')."""
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def sim_config(gw, **knobs) -> None:
    status, _, _ = request("POST", gw.sim + "/config", knobs)
    assert status == 200


def pacer_idle(gw, account: str) -> bool:
    status, _, raw = request(
        "GET", gw.url + f"/api/admin/state?role=pacer:{account}", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, raw
    pacer = json.loads(raw)["results"][f"pacer:{account}"]
    return pacer["in_flight"] == 0 and pacer["queue_depth"] == 0


def retries_total(gw, reason: str = r"[a-z0-9]+") -> float:
    """sluice_upstream_retries_total of the simulated provider for `reason` (all reasons by default)."""
    _, _, raw = request("GET", gw.url + "/metrics")
    pattern = rf'sluice_upstream_retries_total\{{provider="simulated",reason="{reason}"\}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, raw.decode()))


def terminal(data: list[dict]) -> list[dict]:
    return [d for d in data if d["type"] in ("done", "error")]


def assert_whole_answer(text: str, data: list[dict], attempts: int | None, calls: list[dict] | None = None) -> None:
    """The whole answer, after `attempts` upstream attempts (None: any number)."""
    seen = [(c["fail"], c.get("outcome"), c.get("started_at"), c.get("first_byte_at")) for c in calls or []]
    assert data[0]["type"] == "meta", (data[:1], "the sim's calls:", seen)
    assert attempts is None or data[0]["attempts"] == attempts, (data[:1], "the sim's calls:", seen)
    assert [d["delta"] for d in data if d["type"] == "delta"] == formats.make_tokens(
        [{"role": "user", "content": text}], TOKENS
    )
    assert terminal(data) == [data[-1]] and data[-1]["type"] == "done", terminal(data)


def burst(gw, directive: str) -> dict[str, list[str]]:
    """1 + 20 identical + 20 distinct clients at once; {marker: [texts]} per upstream body.
    The identical clients' answer starts 1 s late, so all 20 join the one flight."""
    tag = uuid.uuid4().hex[:8]
    groups = {f"one {tag}:": [f"one {tag}:\n#sim {directive} tokens={TOKENS}"]}
    groups[f"same {tag}:"] = [f"same {tag}:\n#sim {directive} tokens={TOKENS} ttft_ms=1000"] * 20
    for i in range(20):
        groups[f"distinct {tag} {i}:"] = [f"distinct {tag} {i}:\n#sim {directive} tokens={TOKENS}"]
    texts = [text for group in groups.values() for text in group]
    with ThreadPoolExecutor(len(texts)) as pool:
        answers = dict(zip(range(len(texts)), pool.map(lambda text: chat(gw, text), texts)))
    out, n = {}, 0
    for marker, group in groups.items():
        out[marker] = [(text, answers[n + i]) for i, text in enumerate(group)]
        n += len(group)
    return out


# --- faults a retry fixes -----------------------------------------------------------------

RETRYABLE = [
    # (the sim's fault, how many times each body fails, the retry reason)
    pytest.param("fail=429 retry_after_s=1", 1, "429", id="429-retry-after-1s"),
    pytest.param("fail=429 retry_after_s=none", 1, "429", id="429-no-retry-after"),
    pytest.param("fail=500", 2, "5xx", id="500-twice"),
    pytest.param("fail=503", 1, "5xx", id="503"),
    pytest.param("fail=reset_first", 1, "reset", id="reset-before-first-byte"),
]


@pytest.mark.parametrize("fault, times, reason", RETRYABLE)
def test_a_fault_before_the_first_byte_is_retried_and_no_client_sees_it(gw, fault, times, reason):
    before, before_all = retries_total(gw, reason), retries_total(gw)
    results = burst(gw, f"{fault} fail_times={times}")
    mode = fault.split()[0].partition("=")[2]
    attempts_of = {}
    for marker, answers in results.items():
        calls = sim_calls(gw, marker)
        # The provider saw exactly the faults it was told to make, then the answer.
        assert [c["fail"] for c in calls] == [mode] * times + ["none"], (marker, calls)
        for text, data in answers:
            # Every client got the whole answer, from the attempt after the faults, or one
            # later: a connection that broke under load before the provider read a request
            # is one more attempt the provider never saw (UPSTREAM_MAX_ATTEMPTS=4 here).
            try:
                assert_whole_answer(text, data, attempts=None, calls=calls)
                assert times + 1 <= data[0]["attempts"] <= times + 2, data[0]
            except AssertionError as failed:  # what the Pool said about its attempts, for the record
                log = Path(gw.log_path).read_text(errors="replace").splitlines()
                said = [line for line in log if "upstream" in line and ("gives up" in line or "retry" in line)]
                raise AssertionError(f"{failed}\nthe gateway's log: {said[-8:]}") from None
        assert len({data[0]["attempts"] for _, data in answers}) == 1, "one call: the same attempts for all"
        attempts_of[marker] = answers[0][1][0]["attempts"]
    extra = {marker: n for marker, n in attempts_of.items() if n > times + 1}
    print(f"bodies that needed one attempt more than the faults: {extra}")
    # 22 upstream bodies (1 + 1 coalesced + 20), each retried `times` times (and any extra
    # attempt above). Under load an HTTP/2 connection can close as a 500 arrives; that
    # attempt counts as a "reset" (the same retry, docs/reliability.md), so the whole count
    # is over every reason.
    retried = sum(n - 1 for n in attempts_of.values())
    assert retried <= 22 * times + len(extra) and len(extra) <= 2, extra
    wait_until(lambda: retries_total(gw) - before_all >= retried, timeout=30, message="retries counted")
    assert retries_total(gw, reason) > before, f"no retry counted as {reason!r}"
    assert retries_total(gw) - before_all == retried


def test_a_429_pauses_the_account_for_its_retry_after(gw):
    text = f"pause {uuid.uuid4().hex[:8]}:\n#sim fail=429 retry_after_s=2 fail_times=1 tokens={TOKENS}"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, gw, text)
        wait_until(lambda: sim_calls(gw, text.split("\n")[0]), message="the 429")

        def paused() -> float:
            _, _, raw = request(
                "GET", gw.url + "/api/admin/state?role=pacer:simulated", headers={"authorization": f"Bearer {TOKEN}"}
            )
            return json.loads(raw)["results"]["pacer:simulated"]["paused_for_s"]

        assert wait_until(paused, timeout=5, message="the Pacer paused") > 0.5
        assert_whole_answer(text, pending.result(), attempts=2)


# --- keepalive and connections the provider closed ------------------------------------------


def test_a_connection_the_provider_closed_for_idling_is_not_reused(gw):
    """The sim closes idle HTTP/2 connections after 0.3 s (GOAWAY + close), well below the
    gateway's keepalive (4 s): the calls after the gap must not go out on the dead one."""
    sim_config(gw, idle_close_s=0.3)
    try:
        tag = uuid.uuid4().hex[:8]
        first = f"idle {tag} first:\n#sim tokens={TOKENS} ttft_ms=0 token_interval_ms=0"
        assert_whole_answer(first, chat(gw, first), attempts=1)
        closes = get_json(gw.sim + "/stats")[1]["idle_closes"]
        wait_until(lambda: get_json(gw.sim + "/stats")[1]["idle_closes"] > closes, message="the sim's idle close")
        texts = [f"idle {tag} {i}:\n#sim tokens={TOKENS}" for i in range(20)]
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda text: chat(gw, text), texts))
        for text, data in zip(texts, answers):
            assert_whole_answer(text, data, attempts=1)
        (old,) = sim_calls(gw, f"idle {tag} first:")
        later = [call for text in texts for call in sim_calls(gw, text.split("\n")[0])]
        assert len(later) == 20 and old["conn_id"] not in {c["conn_id"] for c in later}
    finally:
        sim_config(gw, idle_close_s=0)


def test_the_gateway_lets_an_idle_connection_go_before_the_provider_does(gw):
    """OPENAI_KEEPALIVE_S=0.3, the sim's idle close 5 s: after an idle gap longer than our
    keepalive the next call goes out on a new connection (with a keepalive above the
    provider's it would have reused the old one, and met the provider's close)."""
    sim_config(gw, idle_close_s=5)
    try:
        tag = uuid.uuid4().hex[:8]
        first, second = (f"keepalive {tag} {n}:\n#sim tokens={TOKENS} ttft_ms=0" for n in (1, 2))
        assert_whole_answer(first, chat(gw, first, provider="openai"), attempts=1)
        time.sleep(0.6)  # the idle gap itself is what is tested: longer than our keepalive
        assert_whole_answer(second, chat(gw, second, provider="openai"), attempts=1)
        (a,), (b,) = sim_calls(gw, f"keepalive {tag} 1:"), sim_calls(gw, f"keepalive {tag} 2:")
        assert a["conn_id"] != b["conn_id"]
    finally:
        sim_config(gw, idle_close_s=0)


# --- faults a retry cannot fix ---------------------------------------------------------------


def test_a_provider_that_always_fails_gives_one_error_event_after_the_last_attempt(gw):
    tag = uuid.uuid4().hex[:8]
    one = f"down {tag} one:\n#sim fail=500"
    same = f"down {tag} same:\n#sim fail=500"
    with ThreadPoolExecutor(21) as pool:
        answers = list(pool.map(lambda text: chat(gw, text), [one] + [same] * 20))
    for data in answers:
        assert [d["type"] for d in data] == ["error"] and data[0]["code"] == "upstream_5xx", data
    assert answers[0][0]["attempts"] == MAX_ATTEMPTS
    assert len(sim_calls(gw, f"down {tag} one:")) == MAX_ATTEMPTS  # UPSTREAM_MAX_ATTEMPTS
    assert len(sim_calls(gw, f"down {tag} same:")) == MAX_ATTEMPTS  # the 20 shared one call (and its error)


def test_no_retry_after_the_first_byte(gw):
    tag = uuid.uuid4().hex[:8]
    reset = f"mid {tag} reset:\n#sim fail=reset_mid fail_after_tokens=3 tokens=8"
    stall = f"mid {tag} stall:\n#sim fail=stall fail_after_tokens=3 tokens=8"
    with ThreadPoolExecutor(2) as pool:
        reset_data, stall_data = pool.map(lambda text: chat(gw, text), [reset, stall])
    for data, code in ((reset_data, "upstream_reset"), (stall_data, "upstream_timeout")):
        assert data[0]["type"] == "meta" and data[0]["attempts"] == 1
        assert [d["type"] for d in data].count("delta") == 3
        assert terminal(data) == [data[-1]] and data[-1]["code"] == code
    assert len(sim_calls(gw, f"mid {tag} reset:")) == 1 and len(sim_calls(gw, f"mid {tag} stall:")) == 1


def test_a_tools_request_is_not_retried_on_a_500(gw):
    text = f"tools {uuid.uuid4().hex[:8]}:\n#sim fail=500 fail_times=1"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    data = chat(gw, text, tools=tools)
    assert [d["type"] for d in data] == ["error"] and data[0]["code"] == "upstream_5xx"
    assert len(sim_calls(gw, text.split("\n")[0])) == 1


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(gw):
    """Retry-After 60 s, the retry deadline 15 s: one attempt, the 429 at once (and only
    the ANTHROPIC account's Pacer pauses for the minute)."""
    text = f"later {uuid.uuid4().hex[:8]}:\n#sim fail=429 retry_after_s=60"
    data = chat(gw, text, provider="anthropic")
    assert [d["type"] for d in data] == ["error"] and data[0]["code"] == "upstream_429"
    assert len(sim_calls(gw, text.split("\n")[0])) == 1
