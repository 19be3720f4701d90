"""Circuit breakers, several API keys per account, fallbacks: the plain logic, on a
virtual clock (actors/circuit.py, actors/key_choice.py, actors/pacer_logic.py,
actors/coalescer_logic.py, protocols/config.py)."""

from __future__ import annotations

import pytest

from actors.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitSettings
from actors.coalescer_logic import CoalescerLogic
from actors.key_choice import KeyBucket, choose, retry_order
from actors.pacer_logic import LONGEST_PAUSE_S, PacerLogic, PacerSettings
from actors.pool import key_verdict
from actors.upstream import CallResult
from protocols import config
from protocols import messages as m
from protocols.effects import After, Send
from protocols.gateway_settings import Failover

pytestmark = pytest.mark.unit

FAST = CircuitSettings(failures=3, open_s=10.0, max_open_s=40.0)


# --- the breaker --------------------------------------------------------------------------


def test_opens_after_consecutive_failures_and_a_success_resets_the_count():
    c = CircuitBreaker(FAST)
    assert c.record(False, 0) is None and c.record(False, 1) is None
    assert c.record(True, 2) is None  # the run is broken
    assert c.record(False, 3) is None and c.record(False, 4) is None
    assert c.record(False, 5) == OPEN
    assert not c.allows() and c.opens_total == 1 and c.half_opens_at == 15.0


def test_opens_on_a_failure_share_over_the_window():
    c = CircuitBreaker(CircuitSettings(failures=100, failure_rate=0.5, min_calls=10, window_s=30))
    changes = [c.record(i % 2 == 0, float(i)) for i in range(9)]  # 4 of 9 failed, < 10 calls
    assert changes == [None] * 9
    assert c.record(False, 9.0) == OPEN  # 5 of 10 failed


def test_half_open_lets_one_probe_through_and_its_success_closes():
    c = CircuitBreaker(FAST)
    for t in range(3):
        c.record(False, t)
    assert c.refresh(11.9) is None and not c.allows()
    assert c.refresh(12.0) == HALF_OPEN and c.allows()
    assert c.granted() is True  # the probe
    assert not c.allows()  # only one
    assert c.record(True, 12.5) == CLOSED
    assert c.allows() and c.open_for == 0


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap():
    c = CircuitBreaker(FAST)
    for t in range(3):
        c.record(False, t)
    waits = []
    now = 2.0
    for _ in range(4):
        now = c.half_opens_at
        assert c.refresh(now) == HALF_OPEN
        c.granted()
        assert c.record(False, now) == OPEN
        waits.append(c.open_for)
    assert waits == [20.0, 40.0, 40.0, 40.0]


def test_an_abandoned_probe_lets_another_call_probe():
    c = CircuitBreaker(FAST)
    for t in range(3):
        c.record(False, t)
    c.refresh(20)
    c.granted()
    assert not c.allows()
    c.abandoned()
    assert c.allows() and c.state == HALF_OPEN


def test_late_verdicts_of_calls_granted_before_it_opened_change_nothing():
    c = CircuitBreaker(FAST)
    for t in range(3):
        c.record(False, t)
    assert c.record(True, 3) is None and c.state == OPEN


def test_settings_from_the_configuration_and_their_defaults():
    assert CircuitSettings.from_config(config.load({})) == CircuitSettings()
    s = config.load({"CIRCUIT_OPEN_S": "30", "CIRCUIT_MAX_OPEN_S": "5", "CIRCUIT_FAILURES": "2"})
    got = CircuitSettings.from_config(s)
    assert (got.failures, got.open_s, got.max_open_s) == (2, 30.0, 30.0)  # the cap is never below the first wait


# --- the key choice ----------------------------------------------------------------------


def test_the_least_loaded_key_that_can_grant_is_chosen():
    s = PacerSettings(rps=1, burst=1, concurrency=2)
    a, b = KeyBucket.new(0, 1, FAST), KeyBucket.new(1, 1, FAST)
    assert choose([a, b], 0.0, s, {0: 1}) is b
    assert choose([a, b], 0.0, s, {}) is a  # a tie goes to the next in turn
    assert choose([a, b], 0.0, s, {}, last=0) is b
    assert choose([a, b], 0.0, s, {}, last=1) is a
    b.tokens = 0.0
    assert choose([a, b], 0.0, s, {0: 1}) is a
    a.paused_until = 5.0
    assert choose([a, b], 0.0, s, {}) is None
    a.paused_until = 0.0
    for t in range(3):
        a.circuit.record(False, t)
    assert choose([a, b], 3.0, s, {}) is None  # a is open, b has no token
    b.tokens = 1.0
    assert retry_order([a, b], b) == [1]  # an open key is never a retry's second try
    a.circuit.refresh(20.0)
    assert retry_order([a, b], b) == [1]  # nor a half-open one (only its probe calls it)


def test_key_verdicts_blame_the_key_only_for_what_a_key_can_cause():
    assert key_verdict(CallResult("done", first_byte_at=1.0)) is True
    assert key_verdict(CallResult("error", error={"code": "upstream_5xx", "status": 503})) is False
    assert key_verdict(CallResult("error", error={"code": "upstream_401", "status": 401})) is False
    assert key_verdict(CallResult("error", error={"code": "upstream_reset"})) is False
    assert key_verdict(CallResult("error", error={"code": "upstream_429", "status": 429})) is None
    assert key_verdict(CallResult("error", error={"code": "upstream_400", "status": 400})) is None
    assert key_verdict(CallResult("cancelled")) is None


# --- the Pacer with several keys -----------------------------------------------------------


def request(lease: str, now: float, provider: str = "simulated", **extra) -> m.LeaseRequest:
    return m.LeaseRequest(lease, provider, now, "sim-1", {}, "c:1", **extra)


def sent(effects, kind) -> list:
    return [e.msg for e in effects if isinstance(e, Send) and isinstance(e.msg, kind)]


def pacer(keys=2, rps=100.0, burst=100, concurrency=10, **extra) -> PacerLogic:
    return PacerLogic(
        "simulated", PacerSettings(rps=rps, burst=burst, concurrency=concurrency), keys=keys, circuit=FAST, **extra
    )


def fail_key(p: PacerLogic, key: int, now: float, times: int = 3) -> list:
    """Calls granted on `key` that fail (the Pool's verdict in LeaseRelease)."""
    out = []
    for i in range(times):
        lease = f"fail-{key}-{now}-{i}"
        p.in_flight.pop(lease, None)
        effects = p.handle(request(lease, now), "shard", now)
        opened = sent(effects, m.OpenStream)
        assert opened, effects
        out += p.handle(m.LeaseRelease(lease, None, [[key, False]]), None, now)
    return out


def test_grants_spread_over_the_keys_and_each_key_has_its_own_bucket():
    # RPS 1, BURST 1 per key: 2 keys grant 2 calls per second, not more.
    p = pacer(keys=2, rps=1.0, burst=1)
    grants: list[tuple[float, int]] = []
    effects = []
    for i in range(6):
        effects += p.handle(request(f"l{i}", 0.0), "shard", 0.0)
    now = 0.0
    while True:
        for e in effects:
            if isinstance(e, Send) and isinstance(e.msg, m.OpenStream):
                grants.append((now, e.msg.key))
        if len(grants) == 6:
            break
        ticks = [e for e in effects if isinstance(e, After)]
        assert ticks, "the Pacer must wake itself up for the queue"
        now += ticks[0].delay_s
        effects = p.handle(ticks[0].msg, None, now)
    assert [k for _, k in grants] == [0, 1, 0, 1, 0, 1]
    assert [round(t, 6) for t, _ in grants] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert [k["key"] for k in p.state(now)["keys"]] == ["#1", "#2"]


def test_a_failing_key_opens_and_calls_go_to_the_other_key():
    p = pacer()
    p.handle(request("warm", 0.0), "shard", 0.0)  # key #1
    p.handle(m.LeaseRelease("warm", None, [[0, True]]), None, 0.0)
    effects = []
    for i in range(3):
        effects += p.handle(m.LeaseRelease(f"x{i}", None, [[0, False]]), None, 1.0)
    records = [r for msg in sent(effects, m.Records) for r in msg.records]
    assert records == [{"kind": "circuit", "account": "simulated", "key": "#1", "state": "open", "at": 1.0}]
    opened = [sent(p.handle(request(f"l{i}", 1.0 + i / 10), "shard", 1.0 + i / 10), m.OpenStream)[0] for i in range(3)]
    assert [(o.key, o.keys) for o in opened] == [(1, [1])] * 3
    assert p.state(1.5)["keys"][0]["circuit"] == "open"


def test_after_the_cool_down_one_probe_goes_out_and_its_success_closes_the_circuit():
    p = pacer(keys=2)
    fail_key(p, 0, 0.0)
    assert p.buckets[0].circuit.state == OPEN
    for lease in list(p.in_flight):
        p.handle(m.LeaseRelease(lease, None), None, 0.0)
    # Load #2 so that #1, once half-open, is the least loaded: the probe goes there.
    p.handle(request("busy", 0.0), "shard", 0.0)
    effects = p.handle(request("probe", 10.0), "shard", 10.0)
    notes = [r for msg in sent(effects, m.Records) for r in msg.records]
    assert [n["state"] for n in notes] == ["half_open"]
    probe = sent(effects, m.OpenStream)[0]
    assert (probe.key, probe.keys) == (0, [0])  # the probe tries its own key only
    # While the probe is out, key #1 takes nothing else.
    assert sent(p.handle(request("other", 10.1), "shard", 10.1), m.OpenStream)[0].key == 1
    effects = p.handle(m.LeaseRelease("probe", None, [[0, True]]), None, 10.5)
    assert [r["state"] for msg in sent(effects, m.Records) for r in msg.records] == ["closed"]
    assert p.buckets[0].circuit.state == CLOSED


def test_every_key_open_and_no_fallback_fails_fast_with_503_and_retry_after():
    p = pacer(keys=2)
    p.handle(request("queued-0", 0.0), "shard", 0.0)
    fail_key(p, 0, 0.0)
    fail_key(p, 1, 0.0)
    effects = p.handle(request("late", 2.0), "shard", 2.0)
    (denied,) = sent(effects, m.LeaseDenied)
    assert (denied.status, denied.code) == (503, "upstream_unavailable")
    assert denied.retry_after_s == 8.0  # until the first key half-opens
    assert "circuit is open" in denied.message


def test_waiters_queued_when_every_key_opens_fail_at_once_their_streams_too():
    p = pacer(keys=1, concurrency=1)
    p.handle(request("running", 0.0), "shard", 0.0)
    assert sent(p.handle(request("waiting", 0.0), "shard", 0.0), m.LeaseQueued)
    p.handle(m.LeaseRelease("running", None, [[0, False]]), None, 0.1)  # frees the slot: "waiting" runs
    p.handle(m.LeaseRelease("waiting", None, [[0, False]]), None, 0.2)
    p.handle(request("r3", 0.3), "shard", 0.3)
    p.handle(request("q4", 0.3), "shard", 0.3)  # queued behind r3
    effects = p.handle(m.LeaseRelease("r3", None, [[0, False]]), None, 0.4)  # the third failure opens it
    assert [d.code for d in sent(effects, m.LeaseDenied)] == ["upstream_unavailable"]
    assert [f.stream_id for f in sent(effects, m.FailStream)] == ["q4"]
    assert p.state(0.4)["queue_depth"] == 0


def test_every_key_open_with_fallbacks_sends_the_call_to_the_first_and_passes_the_rest():
    p = pacer(keys=1, fallbacks=[["openai", "gpt-4o-mini"], ["anthropic", "claude"]])
    fail_key(p, 0, 0.0)
    effects = p.handle(request("l1", 1.0), "shard", 1.0)
    (fb,) = sent(effects, m.LeaseFallback)
    assert (fb.provider, fb.model, fb.fallbacks, fb.fallback_from, fb.reason) == (
        "openai",
        "gpt-4o-mini",
        [["anthropic", "claude"]],
        "simulated",
        "circuits_open",
    )
    records = [r for msg in sent(effects, m.Records) for r in msg.records if r["kind"] == "fallback"]
    assert records == [{"kind": "fallback", "from": "simulated", "to": "openai", "reason": "circuits_open", "at": 1.0}]
    assert p.state(1.0)["fallbacks_total"] == 1


def test_a_fallback_request_uses_its_own_list_never_the_fallback_accounts():
    p = pacer(keys=1, fallbacks=[["anthropic", "claude"]])
    fail_key(p, 0, 0.0)
    effects = p.handle(request("l1", 1.0, provider="openai", fallback_from="simulated", fallbacks=[]), "shard", 1.0)
    assert sent(effects, m.LeaseFallback) == []
    assert sent(effects, m.LeaseDenied)[0].code == "upstream_unavailable"


def test_a_queue_past_the_threshold_sends_new_requests_to_the_fallback():
    p = pacer(keys=1, concurrency=1, fallbacks=[["openai", "gpt-4o-mini"]], fallback_queue=2)
    p.handle(request("run", 0.0), "shard", 0.0)
    assert sent(p.handle(request("q1", 0.0), "shard", 0.0), m.LeaseQueued)
    assert sent(p.handle(request("q2", 0.0), "shard", 0.0), m.LeaseQueued)
    (fb,) = sent(p.handle(request("q3", 0.0), "shard", 0.0), m.LeaseFallback)
    assert fb.reason == "queue"


def test_a_429_pauses_only_the_key_that_got_it():
    p = pacer(keys=2, rps=100, burst=100)
    p.handle(m.AccountPause("SIMULATED", 5.0, 0), None, 0.0)
    opened = sent(p.handle(request("a", 0.1), "shard", 0.1), m.OpenStream)
    assert opened[0].key == 1
    assert [k["paused_for_s"] for k in p.state(0.1)["keys"]] == [4.9, 0.0]


def test_a_provider_retry_after_pauses_a_key_at_most_longest_pause_s():
    # One 429 with Retry-After 1,000,000 (a provider's bug, a ms/s mix-up) paused the key
    # 11.6 days: every request 429 at once, until the Pacer restarted.
    p = pacer(keys=2, rps=100, burst=100)
    p.handle(m.AccountPause("SIMULATED", 1e6, 0), None, 0.0)
    (opened,) = sent(p.handle(request("a", 0.0), "shard", 0.0), m.OpenStream)
    assert opened.key == 1
    p.handle(m.LeaseRelease("a", retry_after_s=1e300), "pool", 0.0)  # the same through a release
    assert [k["paused_for_s"] for k in p.state(0.0)["keys"]] == [LONGEST_PAUSE_S, LONGEST_PAUSE_S]
    after = LONGEST_PAUSE_S + 0.1  # then the account is tried again
    assert sent(p.handle(request("b", after), "shard", after), m.OpenStream)


def test_set_pacer_applies_to_every_key():
    p = pacer(keys=3, rps=10, burst=10)
    p.configure({"burst": 2}, 0.0)
    assert [k["tokens"] for k in p.state(0.0)["keys"]] == [2.0, 2.0, 2.0]


# --- the Coalescer follows a fallback -------------------------------------------------------


def test_the_coalescer_asks_the_fallbacks_pacer_with_the_same_stream_and_key():
    c = CoalescerLogic(me="c:1", secret=b"s" * 32, new_stream_id=lambda: "s-1")
    submit = m.Submit("r1", "k", "simulated", "sim-1", {"messages": []}, "edge-1", 0.0)
    (ask,) = c.handle(submit, "edge", 0.0)
    assert ask.to == "pacer:simulated"
    effects = c.handle(m.LeaseFallback("s-1", "openai", "gpt-4o-mini", [], "simulated", "circuits_open"), "pacer", 0.1)
    (again,) = effects
    assert again.to == "pacer:openai"
    assert (again.msg.lease_id, again.msg.provider, again.msg.model, again.msg.fallback_from) == (
        "s-1",
        "openai",
        "gpt-4o-mini",
        "simulated",
    )
    # A follower joins the same flight and gets the fallback's stream.
    (admitted,) = c.handle(m.LeaseGranted("s-1", 1.0, "pool"), "pacer", 0.2)
    assert admitted.msg.stream_id == "s-1"
    (follower,) = c.handle(m.Submit("r2", "k", "simulated", "sim-1", {"messages": []}, "edge-1", 0.3), "edge", 0.3)
    assert follower.msg.stream_id == "s-1" and follower.msg.role == "follower"


# --- configuration -------------------------------------------------------------------------


def test_config_several_keys_and_fallbacks():
    s = config.load(
        {
            "SIMULATED_API_KEYS": "a, b,c",
            "OPENAI_API_KEY": "o",
            "SIMULATED_FALLBACK": "openai,openai/gpt-x",
            "SIMULATED_FALLBACK_QUEUE": "5",
        }
    )
    assert s.providers["simulated"].api_keys == ("a", "b", "c")
    assert s.failover["SIMULATED"] == Failover(3, (("openai", "gpt-4o-mini"), ("openai", "gpt-x")), 5)
    assert s.failover["OPENAI"] == Failover(keys=1, fallbacks=(), fallback_queue=0)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"SIMULATED_API_KEY": "a", "SIMULATED_API_KEYS": "b,c"}, "both set"),
        ({"SIMULATED_API_KEYS": "a,,b"}, "empty key"),
        ({"SIMULATED_API_KEYS": "a,a"}, "twice"),
        ({"SIMULATED_FALLBACK": "openai"}, "not a configured provider"),
        ({"OPENAI_API_KEY": "o", "OPENAI_FALLBACK": "openai_responses"}, "same account"),
        ({"SIMULATED_FALLBACK_QUEUE": "-1"}, "SIMULATED_FALLBACK_QUEUE"),
        ({"CIRCUIT_FAILURE_RATE": "2"}, "CIRCUIT_FAILURE_RATE"),
    ],
)
def test_config_errors_name_the_variable_and_never_a_key(env, words):
    with pytest.raises(config.ConfigError) as info:
        config.load(env)
    assert words in str(info.value)
    for value in ("b,c", "a,,b", "a,a"):
        if env.get("SIMULATED_API_KEYS") == value:
            assert value not in str(info.value)


def test_a_breaker_switched_off_never_opens():
    c = CircuitBreaker(CircuitSettings(failures=0))
    for i in range(100):
        assert c.record(False, float(i)) is None
    assert c.state == CLOSED and c.allows()
