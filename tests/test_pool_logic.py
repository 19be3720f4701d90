"""Unit tests for actors/pool_logic.py: the Pool's control logic on a fake clock, with the
real HubLogic as its hub. Every way a call can end owes the Pacer one LeaseRelease and the
Coalescer one StreamFinished, and leaves a terminal event at the hub; an abort or a
failure of a stream the Pool does not run changes nothing it should not."""

from __future__ import annotations

import pytest

from actors.hub_logic import HubLogic
from actors.pool_logic import (
    OPENED_FLUSH_S,
    RECORD_BATCH,
    RECORD_FLUSH_S,
    CallEnd,
    FlushOpened,
    FlushRecords,
    MarkOpen,
    PoolLogic,
    Publish,
    Start,
    Stop,
)
from protocols import events as ev
from protocols import messages as m
from protocols.effects import After, Send

pytestmark = pytest.mark.unit

SHARD = "coalescer:0@2"  # the address of the shard incarnation that asked
PACER = "pacer:simulated"
DONE = ev.done("stop", {"prompt_tokens": 3, "completion_tokens": 5})


class Host:
    """What actors/pool.py does with the effects, minus the I/O: hub effects go to a real
    HubLogic, the rest is kept for the test to read."""

    def __init__(self, accounts=None):
        self.hub = HubLogic(b"test secret")
        self.logic = PoolLogic("pool:1", self.hub, accounts)
        self.sent: list[Send] = []
        self.timers: list[After] = []
        self.started: list[str] = []
        self.stopped: list[str] = []

    def run(self, effects, now=0.0):
        for effect in effects:
            if isinstance(effect, Publish):
                self.hub.publish(effect.stream_id, effect.events, now)
            elif isinstance(effect, MarkOpen):
                self.hub.mark_open(effect.stream_id, now)
            elif isinstance(effect, Start):
                self.started.append(effect.open.stream_id)
            elif isinstance(effect, Stop):
                self.stopped.append(effect.stream_id)
            elif isinstance(effect, After):
                self.timers.append(effect)
            elif isinstance(effect, Send):
                self.sent.append(effect)
            else:
                raise AssertionError(f"unexpected effect {effect!r}")
        return effects

    def handle(self, msg, now=0.0):
        return self.run(self.logic.handle(msg, now), now)

    def ended(self, stream_id, end, now=1.0):
        return self.run(self.logic.ended(stream_id, end, now), now)

    def publish(self, stream_id, events, now=0.5):
        """The upstream call's own events (run_call publishes them straight to the hub)."""
        self.hub.publish(stream_id, events, now)

    def of(self, kind):
        return [s for s in self.sent if isinstance(s.msg, kind)]

    def records(self, kind=None):
        return [r for s in self.of(m.Records) for r in s.msg.records if kind is None or r["kind"] == kind]

    def flush(self, now=2.0):
        return self.handle(FlushRecords(), now)


def open_stream(stream_id="s-1", provider="simulated"):
    return m.OpenStream(stream_id, provider, "sim-1", {"messages": []}, stream_id, 12.0, SHARD)


def opened(host, stream_id="s-1"):
    effects = host.handle(open_stream(stream_id))
    assert host.started == [stream_id] and MarkOpen(stream_id) in effects
    return host


def ended_done(host):
    host.publish("s-1", [ev.delta("hi"), DONE])
    host.ended("s-1", CallEnd("done", None, None, 0.1, 0.3, 0.9, 1, [[0, True]], DONE["usage"]))


def ended_in_error(host):
    error = {**ev.error("upstream_5xx", "503"), "status": 503}
    host.publish("s-1", [error])
    host.ended("s-1", CallEnd("error", error, 2.0, 0.1, None, 0.2, 2, [[0, False]]))


def ended_with_nothing(host):
    """The call raised (or was cancelled before it ran): the host has no result."""
    host.ended("s-1", None)


def aborted(host):
    host.handle(m.AbortStream("s-1", 0.4), 0.45)
    assert host.stopped == ["s-1"]
    host.publish("s-1", [ev.error("cancelled", "cancelled: no subscriber left")])
    host.ended("s-1", None)


def failed_while_running(host):
    host.handle(m.FailStream("s-1", "cancelled", "everyone left"), 0.45)
    assert host.stopped == ["s-1"]
    host.ended("s-1", CallEnd("cancelled"))


def aborted_before_it_ran(host):
    """Cancelled before its task's first step: nothing reached the hub."""
    host.handle(m.AbortStream("s-1", 0.4), 0.45)
    host.ended("s-1", None)


ENDINGS = {
    "done": (ended_done, "done"),
    "error": (ended_in_error, "error"),
    "crash": (ended_with_nothing, "error"),
    "abort": (aborted, "cancelled"),
    "fail_stream": (failed_while_running, "cancelled"),
    "abort_before_run": (aborted_before_it_ran, "cancelled"),
}


@pytest.mark.parametrize("ending", ENDINGS, ids=str)
def test_every_ending_releases_the_lease_and_tells_the_coalescer_once(ending):
    end, outcome = ENDINGS[ending]
    host = opened(Host())
    end(host)
    [release] = host.of(m.LeaseRelease)
    [finished] = host.of(m.StreamFinished)
    assert release.to == PACER and release.msg.lease_id == "s-1"
    assert finished.to == SHARD and finished.msg == m.StreamFinished("s-1", outcome, finished.msg.error, "pool:1")
    assert (finished.msg.error is None) == (outcome != "error")
    assert outcome != "error" or finished.msg.error == host.hub.last_event("s-1"), "what the hub's clients got"
    assert host.hub.is_finished("s-1"), "the hub got a terminal event"
    assert host.logic.calls == {}
    assert host.ended("s-1", CallEnd("done")) == [], "a second report of the end owes nothing"
    assert len(host.of(m.LeaseRelease)) == len(host.of(m.StreamFinished)) == 1


def test_the_ending_carries_retry_after_and_key_verdicts_to_the_pacer():
    host = opened(Host())
    ended_in_error(host)
    [release] = host.of(m.LeaseRelease)
    assert release.msg == m.LeaseRelease("s-1", 2.0, [[0, False]])
    assert host.of(m.StreamFinished)[0].msg.error["code"] == "upstream_5xx"


def test_an_ending_the_hub_never_heard_of_is_published_there():
    host = opened(Host())
    aborted_before_it_ran(host)
    assert host.hub.last_event("s-1") == ev.error("cancelled", "cancelled: no subscriber left")
    host2 = opened(Host())
    ended_with_nothing(host2)
    assert host2.hub.last_event("s-1")["code"] == "internal_error"


def test_a_terminal_event_already_at_the_hub_is_not_published_again():
    host = opened(Host())
    host.publish("s-1", [DONE])
    effects = host.ended("s-1", CallEnd("done"))
    assert not [e for e in effects if isinstance(e, Publish)]


def test_an_abort_or_failure_of_a_stream_without_a_call():
    host = Host()
    host.flush()  # the first gauge (0) reported: no timer in what follows
    host.sent.clear()
    assert host.handle(m.AbortStream("nope", 1.0)) == [], "unknown stream: nothing to stop, nothing owed"
    effects = host.handle(m.FailStream("s-9", "queue_timeout", "waited too long"))
    assert effects == [MarkOpen("s-9"), Publish("s-9", [ev.error("queue_timeout", "waited too long")])]
    assert host.sent == [] and host.stopped == [], "the shard cancelled the lease itself: no LeaseRelease"
    assert host.hub.last_event("s-9")["code"] == "queue_timeout"


def test_an_abort_after_the_end_and_a_second_abort_change_nothing():
    host = opened(Host())
    host.handle(m.AbortStream("s-1", 0.4))
    assert host.handle(m.AbortStream("s-1", 0.5)) == [], "being stopped already"
    host.ended("s-1", None)
    assert host.handle(m.AbortStream("s-1", 0.6)) == []
    assert host.stopped == ["s-1"]
    host.flush()
    [cancel] = host.records("cancel")
    assert cancel["cancel_ms"] == pytest.approx(600.0), "measured from the first abort asked"


def test_an_abort_that_reaches_a_call_as_it_ends_on_its_own_cancels_nothing():
    host = opened(Host())
    host.handle(m.AbortStream("s-1", 0.8), 0.85)  # the host's task had finished: nothing to cancel
    ended_done(host)
    assert host.of(m.StreamFinished)[0].msg.outcome == "done", "the hub got `done`: so does the Coalescer"
    host.flush()
    assert host.records("cancel") == [] and host.records("upstream")[0]["outcome"] == "done"


def test_a_duplicate_open_runs_nothing_more():
    host = opened(Host())
    assert host.handle(open_stream()) == []
    assert host.started == ["s-1"]


@pytest.mark.parametrize(
    ("last", "outcome"), [(DONE, "done"), (ev.error("upstream_5xx", "503"), "error")], ids=["done", "error"]
)
def test_a_grant_for_a_stream_that_is_over_goes_straight_back(last, outcome):
    host = opened(Host())
    host.publish("s-1", [last])
    host.ended("s-1", CallEnd(outcome, None if outcome == "done" else last))
    host.sent.clear()
    again = m.OpenStream("s-1", "simulated", "sim-1", {}, "s-1", 0.0, "coalescer:0@3")
    host.handle(again)
    assert host.started == ["s-1"], "no second call"
    assert [s.msg for s in host.of(m.LeaseRelease)] == [m.LeaseRelease("s-1", None)]
    [finished] = host.of(m.StreamFinished)
    assert finished.to == "coalescer:0@3" and finished.msg.outcome == outcome
    assert finished.msg.error == (None if outcome == "done" else last)


def test_the_pacer_is_the_accounts():
    host = Host({"perplexity_sonar": "PERPLEXITY"})
    host.handle(open_stream(provider="perplexity_sonar"))
    host.ended("s-1", None)
    assert host.of(m.LeaseRelease)[0].to == "pacer:perplexity"


def test_upstream_and_cancel_records_go_to_metrics_in_one_batch():
    host = opened(Host())
    ended_done(host)
    assert host.of(m.Records) == [], "not one message per record"
    [timer] = host.timers
    assert timer == After(RECORD_FLUSH_S, FlushRecords())
    host.flush()
    [batch] = host.of(m.Records)
    assert batch.to == "metrics" and batch.msg.source == "pool:1"
    [upstream] = host.records("upstream")
    assert upstream["outcome"] == "done" and upstream["attempts"] == 1
    assert upstream["upstream_ttft_ms"] == pytest.approx(200.0) and upstream["latency_ms"] == pytest.approx(800.0)
    assert (upstream["input_tokens"], upstream["output_tokens"], upstream["model"]) == (3, 5, "sim-1")
    [gauge] = host.records("gauge")
    assert gauge["name"] == "active_streams" and gauge["value"] == 0 and gauge["labels"] == {"pool": "pool:1"}


def test_the_gauge_goes_only_when_it_changed_and_timers_stop_when_idle():
    host = opened(Host())
    assert len(host.timers) == 1, "the open changed the gauge"
    host.flush(0.1)
    assert [r["value"] for r in host.records("gauge")] == [1]
    host.timers.clear()
    assert host.flush(0.2) == [], "nothing new: nothing sent, no timer"
    host.ended("s-1", None, now=0.3)
    host.flush(0.4)
    assert [r["value"] for r in host.records("gauge")] == [1, 0]


def test_a_full_batch_goes_at_once():
    host = Host()
    for i in range(RECORD_BATCH):
        host.handle(open_stream(f"s-{i}"))
        host.ended(f"s-{i}", None)
    [batch] = host.of(m.Records)
    assert len(batch.msg.records) == RECORD_BATCH
    assert len(host.timers) == 1, "one timer for what is still pending"


def test_a_retry_pauses_the_account_on_a_429_and_is_recorded():
    host = opened(Host())
    assert host.run(host.logic.retrying("s-1", "SIMULATED", 1, "reset", 1, 0.0, 0.2)) == []
    effects = host.run(host.logic.retrying("s-1", "SIMULATED", 1, "rate_limited", 2, 1.5, 0.3))
    assert Send("pacer:simulated", m.AccountPause("SIMULATED", 1.5, 1)) in effects
    host.flush()
    assert [(r["reason"], r["attempt"]) for r in host.records("retry")] == [("reset", 2), ("rate_limited", 3)]
    assert host.logic.retrying("gone", "SIMULATED", 0, "reset", 1, 1.0, 0.4) == []


# --- calls opened from lease slices: their Pacer hears of them (docs/architecture.md) -----------


def slice_open(stream_id: str, pool: str = "pool:1@1") -> m.OpenStream:
    """A shard's OpenStream from its lease slice: it names the Pool incarnation of the grant."""
    return m.OpenStream(stream_id, "simulated", "sim-1", {"messages": []}, stream_id, 0.0, SHARD, pool=pool)


def opened_timers(host) -> list[After]:
    return [t for t in host.timers if isinstance(t.msg, FlushOpened)]


def test_calls_opened_from_slices_ride_on_the_next_release_to_their_pacer():
    host = Host()
    host.handle(slice_open("g-1"), 0.0)
    host.handle(slice_open("g-2"), 0.05)
    host.handle(open_stream("s-1"), 0.05)  # the Pacer's own grant: it knows this one
    assert host.logic.state()["unreported_opens"] == 2
    host.ended("s-1", CallEnd("done"), now=0.1)
    [release] = host.of(m.LeaseRelease)
    assert release.to == PACER and release.msg.lease_id == "s-1" and release.msg.opened == ["g-1", "g-2"]
    [timer] = opened_timers(host)
    assert timer.delay_s == pytest.approx(OPENED_FLUSH_S)
    assert host.handle(FlushOpened(), OPENED_FLUSH_S) == [], "told already: nothing more goes"
    assert not host.of(m.SliceOpened)
    # Their own ends say the rest: a release carries no word of itself.
    host.ended("g-1", CallEnd("done"), now=0.5)
    assert host.of(m.LeaseRelease)[-1].msg == m.LeaseRelease("g-1", None, None, None)


def test_calls_no_release_reports_go_in_one_slice_opened_after_opened_flush_s():
    host = Host()
    host.handle(slice_open("g-1"), 0.0)
    host.handle(slice_open("g-2"), 0.2)
    assert len(opened_timers(host)) == 1, "one timer for all of them"
    host.handle(FlushOpened(), OPENED_FLUSH_S)
    [notice] = host.of(m.SliceOpened)
    assert notice.to == PACER and notice.msg == m.SliceOpened("pool:1", ["g-1", "g-2"])
    host.ended("g-2", CallEnd("done"), now=0.5)
    assert host.of(m.LeaseRelease)[-1].msg.opened is None, "told once"


def test_the_notice_timer_waits_for_the_oldest_call_not_yet_told():
    host = Host()
    host.handle(open_stream("s-1"), 0.0)
    host.handle(slice_open("g-1"), 0.0)
    host.ended("s-1", CallEnd("done"), now=0.1)  # carries g-1
    host.handle(slice_open("g-2"), 0.2)
    host.timers.clear()
    assert host.handle(FlushOpened(), OPENED_FLUSH_S) == [After(pytest.approx(0.2), FlushOpened())]
    assert not host.of(m.SliceOpened), "g-2 still has time to ride on a release"
    host.handle(FlushOpened(), 0.2 + OPENED_FLUSH_S)
    assert [n.msg.lease_ids for n in host.of(m.SliceOpened)] == [["g-2"]]


def test_a_slice_open_refused_here_or_its_call_ended_is_not_told_as_opened():
    host = Host()
    host.logic.incarnation = "pool:1@2"
    host.handle(slice_open("g-1", pool="pool:1@1"), 0.0)  # cut on the dead predecessor
    assert [r.msg.lease_id for r in host.of(m.LeaseRelease)] == ["g-1"] and not opened_timers(host)
    host.handle(slice_open("g-2", pool="pool:1@2"), 0.1)
    host.ended("g-2", CallEnd("done"), now=0.2)  # over before any notice: its release says it
    host.handle(FlushOpened(), 0.1 + OPENED_FLUSH_S)
    assert not host.of(m.SliceOpened) and host.logic.unreported == {}


def test_an_unexpected_message_is_a_type_error():
    with pytest.raises(TypeError):
        Host().logic.handle(m.Subscribe("s-1", "t"), 0.0)


def test_a_stream_nobody_opened_is_an_orphan_a_minute_after_the_pacers_longest_wait():
    from actors.hub_logic import orphan_after
    from protocols.settings import PacerSettings
    from sim.harness import Simulation

    assert orphan_after(30.0) == 90.0
    sim = Simulation(seed=1, pacer=PacerSettings(max_wait_s=8.0))  # the simulated Pool's hub: the same rule
    assert sim.pool.hub.orphan_s == orphan_after(8.0) == 68.0


def test_the_gauge_goes_again_unchanged_for_a_new_metrics_actor():
    logic = Host().logic
    [first] = logic.flush_with_gauge(0.0)
    assert [r["value"] for r in first.msg.records if r["kind"] == "gauge"] == [0]
    assert logic.flush(1.0) == [], "unchanged: not again"
    [again] = logic.flush_with_gauge(2.0)
    assert [r["value"] for r in again.msg.records if r["kind"] == "gauge"] == [0]
