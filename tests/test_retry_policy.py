"""The retry decision (actors/retry_policy.py): what is retried, when, and what stops it."""

from __future__ import annotations

import h2.errors
import h2.events
import httpcore
import pytest

from actors.pacer_logic import PacerLogic, PacerSettings
from actors.retry_policy import (
    CONNECT,
    RATE_LIMITED,
    RESET,
    SERVER,
    TIMEOUT,
    Failure,
    RetryPolicy,
    RetrySettings,
    failure_of_status,
    is_idempotent,
)
from actors.upstream import _classify, failure_of_exception
from protocols import messages as m
from protocols.effects import After, Send

pytestmark = pytest.mark.unit

T0 = 1000.0


def policy(**settings) -> RetryPolicy:
    """Jitter 0; a budget that never runs out unless the test sets one."""
    return RetryPolicy(RetrySettings(**{"budget_min": 1000, **settings}), jitter=lambda: 0.0)


def test_what_is_retryable():
    assert failure_of_status(429, 2.0) == Failure(RATE_LIMITED, unprocessed=True, retry_after_s=2.0)
    assert failure_of_status(503, None) == Failure(SERVER)
    assert failure_of_status(529, None).reason == SERVER
    for status in (400, 401, 404, 413, 501):
        assert failure_of_status(status, None) is None
    assert failure_of_exception(httpcore.ConnectError("refused")) == Failure(CONNECT, unprocessed=True)
    assert failure_of_exception(httpcore.RemoteProtocolError("Server disconnected")) == Failure(RESET)
    # A stall: retried for idempotent requests only (the provider may still be working on it).
    assert failure_of_exception(httpcore.ReadTimeout("slow")) == Failure(TIMEOUT)
    assert failure_of_exception(httpcore.PoolTimeout("busy")) is None
    refused = h2.events.StreamReset(stream_id=3, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
    assert failure_of_exception(httpcore.RemoteProtocolError(refused)) == Failure(RESET, unprocessed=True)


def test_an_exception_escaping_the_http_library_is_a_broken_connection():
    """Under uvloop a connection reset as it is accepted can surface from anyio as a
    ValueError ("negative file descriptor") or AttributeError: a reset, not a crash."""
    from httpcore._utils import is_socket_readable

    class Gone:
        def fileno(self):
            raise ValueError("negative file descriptor")

    try:
        is_socket_readable(Gone())  # raised inside httpcore's code
    except ValueError as exc:
        assert failure_of_exception(exc) == Failure(RESET)
    try:
        raise ValueError("a bug of ours")
    except ValueError as exc:
        assert failure_of_exception(exc) is None  # not the library's: not retried


def test_a_broken_connection_without_text_says_what_it_was():
    """httpcore maps anyio's EndOfStream (the provider closed) and ClosedResourceError (we
    closed the socket) to a ReadError with no text: the error names both types."""
    import anyio
    from httpcore._exceptions import map_exceptions

    for cause, name in ((anyio.EndOfStream(), "EndOfStream"), (anyio.ClosedResourceError(), "ClosedResourceError")):
        try:
            with map_exceptions({type(cause): httpcore.ReadError}):  # as httpcore's anyio backend reads
                raise cause
        except httpcore.ReadError as mapped:
            assert _classify(mapped) == ("upstream_reset", f"the provider broke the stream off: ReadError ({name})")
    assert _classify(httpcore.RemoteProtocolError("Server disconnected")) == (
        "upstream_reset",
        "the provider broke the stream off: Server disconnected",
    )


def test_delays_by_reason():
    p = policy()
    assert p.decide("A", Failure(RESET), 1, True, T0, T0).delay_s == 0.0
    assert p.decide("A", Failure(SERVER), 1, True, T0, T0).delay_s == 0.05  # 0.1 s x (0.5 + 0.5 x jitter 0)
    assert p.decide("A", Failure(SERVER), 2, True, T0, T0).delay_s == 0.1
    assert p.decide("A", Failure(SERVER, retry_after_s=2.0), 1, True, T0, T0).delay_s == 2.0
    limited = p.decide("A", Failure(RATE_LIMITED, True, 1.5), 1, True, T0, T0)
    assert (limited.retry, limited.delay_s, limited.pause_s) == (True, 1.5, 1.5)  # the Pacer pauses as long
    bare = p.decide("A", Failure(RATE_LIMITED, True, None), 1, True, T0, T0)
    assert bare.delay_s == 1.0 and bare.pause_s == 1.0
    assert p.decide("A", Failure(CONNECT, True), 1, True, T0, T0).pause_s == 0.0
    assert p.decide("A", Failure(TIMEOUT), 1, True, T0, T0).delay_s == 0.0  # it waited the read timeout already
    assert policy(backoff_s=1.0).decide("A", Failure(CONNECT, True), 2, True, T0, T0).delay_s == 1.0


def test_a_stall_is_retried_only_within_the_deadline_and_never_for_tools():
    p = policy(deadline_s=15.0)
    assert p.decide("A", Failure(TIMEOUT), 1, True, T0, T0 + 2.0).retry  # a short read timeout
    assert p.decide("A", Failure(TIMEOUT), 1, True, T0, T0 + 60.0).why_not == "deadline"  # the default 60 s
    assert p.decide("A", Failure(TIMEOUT), 1, False, T0, T0 + 2.0).why_not == "non_idempotent"


def test_attempts_are_bounded():
    p = policy(max_attempts=3)
    assert p.decide("A", Failure(RESET), 2, True, T0, T0).retry
    assert p.decide("A", Failure(RESET), 3, True, T0, T0).why_not == "max_attempts"
    assert policy(max_attempts=1).decide("A", Failure(RESET), 1, True, T0, T0).why_not == "max_attempts"


def test_a_retry_after_beyond_the_deadline_is_not_waited_for():
    p = policy(deadline_s=5.0)
    assert p.decide("A", Failure(RATE_LIMITED, True, 4.0), 1, True, T0, T0).retry
    assert p.decide("A", Failure(RATE_LIMITED, True, 4.0), 1, True, T0, T0 + 2.0).why_not == "deadline"
    assert p.decide("A", Failure(RATE_LIMITED, True, 60.0), 1, True, T0, T0).why_not == "deadline"


def test_a_tools_request_is_retried_only_when_the_provider_did_not_process_it():
    body = {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert not is_idempotent(body) and not is_idempotent({"tool_choice": "auto"}) and is_idempotent({"messages": []})
    p = policy()
    assert p.decide("A", Failure(SERVER), 1, False, T0, T0).why_not == "non_idempotent"
    assert p.decide("A", Failure(RESET), 1, False, T0, T0).why_not == "non_idempotent"
    assert p.decide("A", Failure(RATE_LIMITED, True, 0.1), 1, False, T0, T0).retry
    assert p.decide("A", Failure(CONNECT, True), 1, False, T0, T0).retry
    assert p.decide("A", Failure(RESET, unprocessed=True), 1, False, T0, T0).retry


def test_the_budget_stops_retries_when_exhausted_and_refills_with_time():
    p = policy(budget_ratio=0.2, budget_min=3, budget_window_s=10.0, max_attempts=5)
    for _ in range(20):
        p.note_call("A", T0)
    # 20 calls in the window: 20 % is 4 retries (more than the minimum of 3)
    decisions = [p.decide("A", Failure(SERVER), 1, True, T0, T0 + 1) for _ in range(6)]
    assert [d.retry for d in decisions] == [True] * 4 + [False] * 2
    assert decisions[-1].why_not == "budget"
    assert p.decide("B", Failure(SERVER), 1, True, T0, T0 + 1).retry  # per account
    # the window slides: the calls and retries age out, the minimum comes back
    assert p.decide("A", Failure(SERVER), 1, True, T0 + 11, T0 + 11).retry
    p.note_call("A", T0 + 11)
    assert [p.decide("A", Failure(RESET), 1, True, T0 + 11, T0 + 11).retry for _ in range(3)] == [True, True, False]


def test_a_failing_provider_gets_about_one_fifth_more_calls_not_three_times():
    p = policy(budget_ratio=0.2, budget_min=5, budget_window_s=10.0, max_attempts=3)
    upstream = 0
    for i in range(1000):  # 1,000 calls over 10 s, every attempt fails
        now = T0 + i * 0.01
        p.note_call("A", now)
        attempt = 1
        upstream += 1
        while p.decide("A", Failure(SERVER), attempt, True, now, now).retry:
            attempt += 1
            upstream += 1
    assert upstream <= 1000 * 1.2 + 5


def test_account_pause_stops_grants_for_its_duration():
    pacer = PacerLogic("simulated", PacerSettings(rps=100, burst=100, concurrency=10))

    def request(lease: str, now: float) -> list:
        return pacer.handle(m.LeaseRequest(lease, "simulated", now, "sim-1", {}, "c:1"), "shard", now)

    def opened(effects) -> bool:
        return any(isinstance(e, Send) and isinstance(e.msg, m.OpenStream) for e in effects)

    assert opened(request("a", T0))
    pacer.handle(m.AccountPause("SIMULATED", 1.0), None, T0)
    queued = request("b", T0 + 0.1)
    assert not opened(queued) and pacer.state(T0 + 0.1)["paused_for_s"] == 0.9
    (tick,) = [e for e in queued if isinstance(e, After)]
    assert abs(T0 + 0.1 + tick.delay_s - (T0 + 1.0)) < 1e-6  # the queue is looked at when the pause ends
    assert opened(pacer.handle(tick.msg, None, T0 + 1.0))


def test_a_pause_longer_than_the_max_wait_denies_at_once_rather_than_after_the_wait():
    """A 429 with Retry-After 60 s and a 30 s max wait: new requests, and those already
    queued, are told 429 now (with the pause as Retry-After), not after waiting 30 s."""
    pacer = PacerLogic("simulated", PacerSettings(rps=100, burst=100, concurrency=1, max_wait_s=30))

    def request(lease: str, now: float) -> list:
        return pacer.handle(m.LeaseRequest(lease, "simulated", now, "sim-1", {}, "c:1"), "shard", now)

    def denied(effects) -> list:
        return [e.msg for e in effects if isinstance(e, Send) and isinstance(e.msg, m.LeaseDenied)]

    assert not denied(request("running", T0))  # granted: holds the one slot
    assert not denied(request("queued", T0 + 0.1))  # waits for the slot
    out = pacer.handle(m.AccountPause("SIMULATED", 60.0), None, T0 + 0.2)
    (queued,) = denied(out)  # it could only be granted after its wait is over
    assert queued.lease_id == "queued" and queued.code == "pacer_queue_timeout" and queued.retry_after_s >= 59
    assert any(isinstance(e, Send) and isinstance(e.msg, m.FailStream) for e in out)  # its clients listen
    (new,) = denied(request("new", T0 + 0.3))
    assert new.code == "pacer_queue_timeout" and "Retry-After" in new.message and new.retry_after_s >= 59
    assert pacer.state(T0 + 0.3)["queue_depth"] == 0


def test_a_pause_shorter_than_the_max_wait_still_queues():
    pacer = PacerLogic("simulated", PacerSettings(rps=100, burst=100, concurrency=10, max_wait_s=30))
    pacer.handle(m.AccountPause("SIMULATED", 29.0), None, T0)
    out = pacer.handle(m.LeaseRequest("a", "simulated", T0, "sim-1", {}, "c:1"), "shard", T0)
    assert [type(e.msg) for e in out if isinstance(e, Send)] == [m.LeaseQueued]


def test_a_full_per_minute_cap_that_frees_too_late_denies_at_once():
    """RPM 2, a 30 s max wait: after two grants the next place frees 60 s after the first,
    so a third request is told 429 now; once that is under 30 s away, it waits."""
    pacer = PacerLogic("simulated", PacerSettings(rps=100, burst=100, concurrency=10, rpm=2, max_wait_s=30))

    def request(lease: str, now: float) -> list:
        return pacer.handle(m.LeaseRequest(lease, "simulated", now, "sim-1", {}, "c:1"), "shard", now)

    def sent(effects) -> list:
        return [type(e.msg) for e in effects if isinstance(e, Send)]

    assert m.OpenStream in sent(request("a", T0)) and m.OpenStream in sent(request("b", T0 + 1))
    out = request("c", T0 + 2)
    (denied,) = [e.msg for e in out if isinstance(e, Send) and isinstance(e.msg, m.LeaseDenied)]
    assert denied.code == "pacer_queue_timeout" and "per-minute cap" in denied.message
    assert sent(request("d", T0 + 31)) == [m.LeaseQueued]  # its place frees at T0 + 60: in time
