"""Simulation tests: the real Pacer and Coalescer logic under a deterministic simulator.

Every test runs over many seeds (latency jitter, arrival spreads, random workloads all come
from the seed). A failure prints `sluice simulation seed=<n>`; replay one seed with
`SLUICE_SIM_SEED=<n> .venv/bin/pytest tests/test_simulation.py`. Every `sim.run()` that
reaches quiescence also checks the generic invariants (sim/harness.py, check_invariants).
"""

from __future__ import annotations

import pytest

from actors.coalescer_logic import CoalescerFlags
from actors.pacer_logic import PacerSettings
from protocols import messages as m
from protocols import roles
from sim.harness import Simulation, SimulationError, Upstream, chaotic_upstream, seeds

pytestmark = pytest.mark.simulation

HI_MS = 2.0  # upper bound of the default one-hop latency (0.5 .. 2.0 ms)
EPS = 1e-9


def ids(seed):
    return f"seed={seed}"


def reference_grants(requests, releases, rps, burst, concurrency, rpm=None):
    """The token bucket, computed independently of PacerLogic.

    `requests`: [(time the LeaseRequest reached the pacer, lease_id)] in arrival order;
    `releases`: {lease_id: time its release reached the pacer}. FIFO, a bucket of `burst`
    refilled at `rps`, at most `concurrency` leases held, at most `rpm` grants in any 60 s.
    Returns {lease_id: grant time}."""
    grants: dict[str, float] = {}
    tokens, last, previous = float(burst), 0.0, 0.0
    for arrived, lease in requests:
        t = max(arrived, previous)
        while True:
            have = min(burst, tokens + (t - last) * rps)
            need = [t if have >= 1 - EPS else t + (1 - have) / rps]
            held = sorted(releases.get(g, float("inf")) for g in grants if releases.get(g, float("inf")) > t)
            if len(held) >= concurrency:
                need.append(held[len(held) - concurrency])
            if rpm is not None:
                recent = sorted(g for g in grants.values() if g > t - 60.0)
                if len(recent) >= rpm:
                    need.append(recent[len(recent) - rpm] + 60.0)
            later = max(need)
            if later <= t + EPS:
                break
            t = later
        tokens, last = min(burst, tokens + (t - last) * rps) - 1.0, t
        grants[lease] = previous = t
    return grants


def observed_inputs(sim):
    handled = sorted(sim.messages(m.LeaseRequest), key=lambda d: d.order)
    requests = [(d.delivered_at, d.msg.lease_id) for d in handled]
    releases = {lease.lease_id: lease.released_at for lease in sim.leases.values()}
    return requests, releases


def assert_grants_match_reference(sim, settings):
    requests, releases = observed_inputs(sim)
    expected = reference_grants(requests, releases, settings.rps, settings.burst, settings.concurrency, settings.rpm)
    actual = {lease.lease_id: lease.granted_at for lease in sim.leases.values()}
    assert set(actual) == set(expected), f"seed={sim.seed}"
    for lease_id, t in expected.items():
        assert actual[lease_id] == pytest.approx(t, abs=1e-6), f"seed={sim.seed} {lease_id}: {actual[lease_id]} != {t}"


def full_text(call_n, tokens):
    return "".join(f"c{call_n}.{i} " for i in range(tokens))


# --- coalescing and fan-out -----------------------------------------------------------------


def burst_on_one_edge(seed, n):
    sim = Simulation(seed=seed, shards=2, pacer=PacerSettings(rps=1, burst=2, concurrency=3))
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    clients = sim.burst(n, at=0.0, spread_s=0.05, text="same question", edge="e1")
    sim.run()
    return sim, clients


@pytest.mark.parametrize("seed", seeds(40), ids=ids)
def test_burst_of_50_identical_on_one_edge_is_one_call(seed):
    sim, clients = burst_on_one_edge(seed, 50)
    assert sim.pool.calls == 1
    assert [c.outcome for c in clients] == ["done"] * 50
    assert {c.text for c in clients} == {full_text(1, 10)}
    assert all(c.events == clients[0].events for c in clients), "every client sees the same events"
    assert sorted(c.role for c in clients).count("leader") == 1
    # Control messages are O(1) for the whole burst: the same count as for a burst of 2.
    small, _ = burst_on_one_edge(seed, 2)
    assert sim.count() == small.count()
    assert sim.count() == {
        "Submit": 1,
        "Admitted": 1,
        "LeaseRequest": 1,
        "LeaseGranted": 1,
        "OpenStream": 1,
        "LeaseRelease": 1,
        "StreamFinished": 1,
    }


@pytest.mark.parametrize("seed", seeds(8), ids=ids)
def test_thousand_identical_across_three_edges_is_one_call(seed):
    sim = Simulation(seed=seed, shards=3, pacer=PacerSettings(rps=1, burst=2, concurrency=3))
    sim.upstream(ttft_ms=300, token_interval_ms=20, tokens=10)
    clients = [sim.client(at=sim.rng.uniform(0, 0.2), text="hot", edge=f"e{i % 3 + 1}") for i in range(1000)]
    sim.run()
    assert sim.pool.calls == 1
    assert sum(c.outcome == "done" for c in clients) == 1000
    assert {c.text for c in clients} == {full_text(1, 10)}
    counts = sim.count()
    assert counts["Submit"] == 3 and counts["Admitted"] == 3, counts  # one per edge
    assert sum(counts.values()) <= 3 * 2 + 5, counts


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_error_is_shared_then_remembered_for_the_ttl_then_forgotten(seed):
    ttl = 2.0
    sim = Simulation(seed=seed, flags=CoalescerFlags(error_ttl_s=ttl))
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10, fail="error", fail_after=3)
    burst = [sim.client(at=sim.rng.uniform(0, 0.1), text="q", edge=f"e{i % 2 + 1}") for i in range(30)]
    sim.run(until=1.0)
    assert sim.pool.calls == 1
    assert {c.outcome for c in burst} == {"error"}
    errors = [c.error for c in burst]
    assert all(e == errors[0] and e["code"] == "upstream_error" for e in errors)
    assert all(c.events == burst[0].events for c in burst), "the same deltas, then the same error"
    failed_at = sim.pool.log[0].ended_at

    within = sim.client(at=failed_at + ttl - 0.1, text="q", edge="e3")
    sim.run(until=failed_at + ttl + 0.5)
    assert sim.pool.calls == 1, "an identical request within the TTL gets the error, no new call"
    assert within.outcome == "error" and within.events == [errors[0]] and within.replayed

    after = sim.client(at=failed_at + ttl + 1.0, text="q", edge="e1")
    sim.run()
    assert sim.pool.calls == 2, "after the TTL, an identical request is a new call"
    assert after.outcome == "error" and not after.replayed


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_a_remembered_error_is_forgotten_even_when_its_timer_fires_early(seed):
    # Thespian fires wakeups by perf_counter, up to 10 us early, while the logic reads
    # time.time(); a wall-clock step back makes the gap large. Either way the TTL timer
    # can come before the expiry it was set for, and the error must still be forgotten.
    sim = Simulation(seed=seed, flags=CoalescerFlags(error_ttl_s=2.0))
    sim.upstream(ttft_ms=100, fail=500)
    first = sim.client(at=0.0, text="q")
    sim.clock_jump(at=1.0, by_s=-sim.rng.uniform(0.001, 5.0), nodes=[lg.me for lg in sim.coalescers])
    sim.run()  # the checker fails if an error outlives the run
    assert first.outcome == "error" and first.error["code"] == "upstream_5xx"
    assert all(not lg.errors for lg in sim.coalescers)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_leader_leaving_does_not_stop_the_stream_for_followers(seed):
    sim = Simulation(seed=seed)
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    leader = sim.client(at=0.0, text="q", edge="e1", disconnect_at=0.25)
    local = sim.client(at=0.001, text="q", edge="e1")
    remote = [sim.client(at=0.001 + sim.rng.uniform(0, 0.05), text="q", edge="e2") for _ in range(5)]
    sim.run()
    assert leader.role == "leader" and leader.outcome == "disconnected"
    assert sim.pool.calls == 1 and sim.pool.log[0].outcome == "done" and sim.pool.log[0].aborted_at is None
    assert [c.outcome for c in [local, *remote]] == ["done"] * 6
    assert {c.text for c in [local, *remote]} == {full_text(1, 10)}
    assert sim.count()["Cancel"] == 0 and sim.count()["AbortStream"] == 0


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_a_lone_leader_on_another_edge_cancels_only_its_reference(seed):
    sim = Simulation(seed=seed)
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    leader = sim.client(at=0.0, text="q", edge="e1", disconnect_at=0.22)
    followers = [sim.client(at=0.01, text="q", edge="e2") for _ in range(3)]
    sim.run()
    assert leader.outcome == "disconnected"
    assert sim.count()["Cancel"] == 1 and sim.count()["AbortStream"] == 0
    assert [c.outcome for c in followers] == ["done"] * 3 and sim.pool.log[0].outcome == "done"


@pytest.mark.parametrize("seed", seeds(40), ids=ids)
def test_everyone_leaving_aborts_upstream_and_frees_the_slot(seed):
    settings = PacerSettings(rps=10, burst=10, concurrency=1)
    sim = Simulation(seed=seed, pacer=settings)
    sim.upstream(ttft_ms=200, token_interval_ms=50, tokens=20)  # 1.2 s
    leavers = [
        sim.client(at=sim.rng.uniform(0, 0.05), text="q", edge=f"e{i % 3 + 1}", disconnect_at=sim.rng.uniform(0.3, 0.5))
        for i in range(12)
    ]
    waiting = sim.client(at=0.1, text="another question", edge="e1")  # queued behind the only slot
    sim.run()
    aborted = sim.pool.log[0]
    assert aborted.outcome == "cancelled" and sim.count()["AbortStream"] == 1
    last_leave = max(c.disconnect_at for c in leavers)
    assert 0 < aborted.aborted_at - last_leave <= 2 * HI_MS / 1000 + EPS, "abort within two hops of the last cancel"
    assert {c.outcome for c in leavers} == {"disconnected"}
    # The slot came back with the abort: the queued request was granted the moment the
    # Pool's LeaseRelease reached the Pacer.
    first, second = sim.leases[aborted.stream_id], sim.leases[waiting.stream_id]
    assert first.released_by == "LeaseRelease"
    assert second.granted_at == first.released_at
    assert waiting.outcome == "done" and waiting.text == full_text(2, 20)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_everyone_leaving_while_queued_gives_the_lease_back(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=10, burst=10, concurrency=1))
    sim.upstream(ttft_ms=100, token_interval_ms=50, tokens=20)
    busy = sim.client(at=0.0, text="first", edge="e1")
    queued = [sim.client(at=0.05, text="second", edge=f"e{i % 2 + 1}", disconnect_at=0.3 + i * 0.01) for i in range(4)]
    third = sim.client(at=0.06, text="third", edge="e2")
    sim.run()
    assert busy.outcome == "done" and third.outcome == "done"
    assert {c.outcome for c in queued} == {"disconnected"}
    assert sim.pool.calls == 2, "the abandoned request never reached the provider"
    assert sim.count()["LeaseCancel"] >= 1 and sim.count()["AbortStream"] == 0


# The Pacer's grant goes to the Pool (OpenStream) and to the Coalescer (LeaseGranted) at
# once, so the Pool can be ahead of the Coalescer. A slow Pacer -> Coalescer link widens
# that window to half a second.


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_a_call_that_ends_before_its_grant_reaches_the_coalescer_still_serves_everyone(seed):
    sim = Simulation(seed=seed, shards=1)
    sim.slow_link("pacer:simulated", "coalescer:0", 500)
    sim.upstream(ttft_ms=10, token_interval_ms=5, tokens=3)  # over long before the grant lands
    clients = [sim.client(at=0.001 * i, text="q", edge=f"e{i % 2 + 1}") for i in range(4)]
    sim.run()
    call = sim.pool.log[0]
    granted = next(d for d in sim.trace if isinstance(d.msg, m.LeaseGranted))
    finished = next(d for d in sim.trace if isinstance(d.msg, m.StreamFinished))
    assert finished.delivered_at < granted.delivered_at, "the stream ended before the Coalescer saw the grant"
    assert sim.pool.calls == 1 and call.outcome == "done"
    assert {c.outcome for c in clients} == {"done"} and {c.text for c in clients} == {full_text(1, 3)}


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_leaving_before_the_grant_reaches_the_coalescer_stops_the_call_it_opened(seed):
    sim = Simulation(seed=seed, shards=1, pacer=PacerSettings(rps=10, burst=10, concurrency=1))
    sim.slow_link("pacer:simulated", "coalescer:0", 500)
    sim.upstream(ttft_ms=100, token_interval_ms=50, tokens=10)
    busy = sim.client(at=0.0, text="first", edge="e1")  # holds the only slot until ~0.6 s
    queued = [sim.client(at=0.05, text="second", edge=f"e{i + 1}", disconnect_at=0.8) for i in range(2)]
    sim.run()
    assert busy.outcome == "done" and {c.outcome for c in queued} == {"disconnected"}
    second = sim.pool.log[1]
    granted = [d for d in sim.trace if isinstance(d.msg, m.LeaseGranted)][1]
    assert second.opened_at < 0.8 < granted.delivered_at, "opened by the grant, left before the Coalescer saw it"
    assert second.outcome == "cancelled" and 0 < second.aborted_at - 0.8 <= 3 * HI_MS / 1000 + EPS
    # The Coalescer's LeaseCancel and the stopped call's LeaseRelease race to the Pacer:
    # whichever lands first frees the slot, the other finds it gone (the invariants check
    # the slot was freed exactly once).
    lease = sim.leases[second.stream_id]
    assert lease.released_by in ("LeaseCancel", "LeaseRelease") and lease.released_at - 0.8 <= 4 * HI_MS / 1000 + EPS
    # The Coalescer's FailStream stops the call; a LeaseCancel that finds the lease granted
    # makes the Pacer send one too, after its OpenStream (it reaches the Pool the grant
    # went to, should the first one have died with an earlier Pool: seed 237 below).
    assert len(sim.messages(m.FailStream, src="coalescer:0")) == 1 and sim.count()["AbortStream"] == 0
    assert len(sim.messages(m.FailStream, src="pacer:simulated")) == (lease.released_by == "LeaseCancel")


# --- pacing -----------------------------------------------------------------------------------


def test_grant_times_are_the_token_bucket_exactly_without_latency():
    settings = PacerSettings(rps=1, burst=2, concurrency=3)
    sim = Simulation(seed=0, pacer=settings, latency_ms=(0.0, 0.0))
    sim.upstream(ttft_ms=500, token_interval_ms=300, tokens=10)  # every call holds its slot 3.5 s
    clients = [sim.client(at=0.0, text=f"question {i}") for i in range(20)]
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 20
    # Two from the bucket at once, one a second later; then the concurrency cap: the first
    # two end at 3.5 s, the bucket holds 2 again by then, and so on every 3.5 s.
    expected = [3.5 * (i // 3) + (1.0 if i % 3 == 2 else 0.0) for i in range(20)]
    assert [round(t, 9) for t, _ in sim.grants()] == expected


@pytest.mark.parametrize("seed", seeds(40), ids=ids)
def test_grant_times_match_the_token_bucket_under_jitter(seed):
    settings = PacerSettings(rps=1, burst=2, concurrency=3)
    sim = Simulation(seed=seed, pacer=settings)
    sim.upstream(ttft_ms=500, token_interval_ms=300, tokens=10)
    clients = [sim.client(at=sim.rng.uniform(0, 1.0), text=f"question {i}", edge=f"e{i % 2 + 1}") for i in range(20)]
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 20
    assert sim.pool.calls == 20
    assert_grants_match_reference(sim, settings)


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_per_minute_cap(seed):
    settings = PacerSettings(rps=10, burst=5, concurrency=10, rpm=5, max_wait_s=300)
    sim = Simulation(seed=seed, pacer=settings)
    sim.upstream(ttft_ms=100, token_interval_ms=10, tokens=5)
    clients = [sim.client(at=sim.rng.uniform(0, 0.5), text=f"q{i}") for i in range(12)]
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 12
    times = [t for t, _ in sim.grants()]
    assert all(b > 60.0 for b in times[5:10]) and all(b > 120.0 for b in times[10:])
    for i in range(len(times)):  # never more than rpm grants in any 60 s window
        assert sum(1 for t in times if times[i] - 60.0 + 1e-6 < t <= times[i]) <= 5
    assert_grants_match_reference(sim, settings)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_queue_bound_rejects_with_429_and_retry_after(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=1, burst=1, concurrency=1, max_queue=3))
    sim.upstream(ttft_ms=100, token_interval_ms=10, tokens=5)
    clients = [sim.client(at=sim.rng.uniform(0, 0.01), text=f"q{i}") for i in range(10)]
    sim.run()
    rejected = [c for c in clients if c.outcome == "rejected"]
    assert len(rejected) == 6 and sum(c.outcome == "done" for c in clients) == 4
    for c in rejected:
        assert (c.status, c.code) == (429, "pacer_queue_full")
        # 3 waiting + this one, an empty bucket refilling at 1/s: about 4 s.
        assert 3.9 < c.retry_after_s <= 4.0


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_max_wait_denies_with_a_queue_timeout(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=10, burst=10, concurrency=1, max_wait_s=1.0))
    sim.upstream(ttft_ms=100, token_interval_ms=100, tokens=40)  # 4.1 s
    first = sim.client(at=0.0, text="long")
    late = [sim.client(at=0.2 + sim.rng.uniform(0, 0.5), text=f"q{i}", edge="e2") for i in range(3)]
    sim.run()
    assert first.outcome == "done"
    assert {c.outcome for c in late} == {"error"}
    assert {c.error["code"] for c in late} == {"pacer_queue_timeout"}
    asked = {d.msg.lease_id: d.delivered_at for d in sim.messages(m.LeaseRequest)}
    for d in sim.messages(m.LeaseDenied):
        assert d.sent_at == pytest.approx(asked[d.msg.lease_id] + 1.0, abs=1e-9)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_upstream_429_retry_after_pauses_grants(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=10, burst=10, concurrency=1))
    sim.upstream(
        lambda req: (
            Upstream(ttft_ms=100, fail=429, retry_after_s=5.0) if req.n == 1 else Upstream(ttft_ms=100, tokens=3)
        )
    )
    clients = [sim.client(at=0.01 * i, text=f"q{i}") for i in range(4)]
    sim.run()
    assert clients[0].outcome == "error" and clients[0].error["code"] == "upstream_429"
    assert [c.outcome for c in clients[1:]] == ["done"] * 3
    limited = sim.leases[clients[0].stream_id]
    grants = [t for t, _ in sim.grants()]
    assert grants[1] == pytest.approx(limited.released_at + 5.0, abs=1e-9)


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_live_configure_applies_to_the_waiting_queue(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=0.1, burst=1, concurrency=10, max_wait_s=60))
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    clients = [sim.client(at=sim.rng.uniform(0, 0.05), text=f"q{i}") for i in range(10)]
    sim.configure_pacer(at=5.0, rps=10)
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 10
    grants = [t for t, _ in sim.grants()]
    # Until 5 s the bucket refilled at 0.1/s; from then on at 10/s, one token each.
    expected = 5.0 + (1.0 - (5.0 - grants[0]) * 0.1) / 10.0
    for i, t in enumerate(grants[1:]):
        assert t == pytest.approx(expected + i * 0.1, abs=1e-6)


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_live_concurrency_raise_releases_the_queue_at_once(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=100, burst=100, concurrency=1, max_wait_s=60))
    sim.upstream(ttft_ms=1000, token_interval_ms=100, tokens=40)
    clients = [sim.client(at=sim.rng.uniform(0, 0.05), text=f"q{i}") for i in range(6)]
    sim.configure_pacer(at=2.0, concurrency=6)
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 6
    assert [t for t, _ in sim.grants()][1:] == [2.0] * 5


# --- feature flags ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_coalescing_disabled_gives_every_request_its_own_call(seed):
    sim = Simulation(
        seed=seed,
        pacer=PacerSettings(rps=100, burst=100, concurrency=100),
        flags=CoalescerFlags(coalesce_enabled=False),
    )
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=5)
    clients = [sim.client(at=sim.rng.uniform(0, 0.05), text="same", edge=f"e{i % 2 + 1}") for i in range(20)]
    sim.run()
    assert sim.pool.calls == 20
    assert [c.outcome for c in clients] == ["done"] * 20 and {c.role for c in clients} == {"leader"}
    assert len({c.text for c in clients}) == 20
    assert all(d.msg.coalesce is False for d in sim.messages(m.Admitted))


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_fanout_disabled_followers_still_get_the_same_final_text(seed):
    sim = Simulation(seed=seed, flags=CoalescerFlags(stream_fanout_enabled=False))
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    clients = [sim.client(at=sim.rng.uniform(0, 0.1), text="same", edge=f"e{i % 2 + 1}") for i in range(10)]
    sim.run()
    assert sim.pool.calls == 1
    assert {c.text for c in clients} == {full_text(1, 10)} and {c.outcome for c in clients} == {"done"}
    assert all(c.fanout is (c.role == "leader") for c in clients)


# --- faults -----------------------------------------------------------------------------------


def chaos(seed, latency_ms=(0.3, 5.0), kills=0, flips=0, pools=1):
    """A random workload with random faults and live setting changes; all from the seed."""
    settings = PacerSettings(rps=2, burst=3, concurrency=3, rpm=40, max_queue=20, max_wait_s=8)
    sim = Simulation(
        seed=seed,
        shards=3,
        pacer=settings,
        flags=CoalescerFlags(error_ttl_s=1.0),
        latency_ms=latency_ms,
        metrics=True,
        pools=pools,
    )
    rng = sim.rng
    sim.upstream(chaotic_upstream(rng))
    for _ in range(80):
        at = rng.uniform(0, 10)
        leave = at + rng.uniform(0, 2) if rng.random() < 0.3 else None
        sim.client(
            at=at,
            text=f"q{rng.randrange(8)}",
            edge=f"e{rng.randrange(3) + 1}",
            disconnect_at=leave,
            coalesce=rng.random() < 0.9,
        )
    nodes = list(sim.nodes) + ["edge:e1", "edge:e2", "edge:e3"]
    for _ in range(6):
        sim.pause(rng.choice(nodes), at=rng.uniform(0, 10), for_s=rng.uniform(0.01, 2.0))
    for _ in range(3):
        sim.clock_jump(at=rng.uniform(0, 10), by_s=rng.choice([-1, 1]) * rng.uniform(0.5, 10.0))
    sim.configure_pacer(at=rng.uniform(0, 10), rps=rng.choice([1, 2, 5]), concurrency=rng.choice([1, 3, 6]))
    sim.set_flags(at=rng.uniform(0, 10), coalesce_enabled=rng.random() < 0.5, error_ttl_s=rng.choice([0.0, 0.5, 2.0]))
    for _ in range(kills):  # SIGKILLs of our own processes, each replaced after a while
        victim = rng.choice([*sim.pool_roles, "pacer:simulated", "coalescer:0", "coalescer:1", "coalescer:2"])
        sim.kill(victim, at=rng.uniform(0, 10), restart_s=rng.uniform(0.05, 1.5))
    for i in range(flips):  # coalescing switched off and on again by an operator
        sim.set_flags(at=rng.uniform(0, 10), coalesce_enabled=i % 2 == 1)
    return sim


@pytest.mark.parametrize("seed", seeds(50), ids=ids)
def test_pauses_and_clock_jumps_keep_the_invariants(seed):
    sim = chaos(seed)
    sim.run()  # to quiescence: the invariant checker runs there
    assert sim.quiescent
    assert all(c.outcome in ("done", "error", "rejected", "disconnected") for c in sim.clients)


@pytest.mark.parametrize("seed", [10737, 21945], ids=ids)
def test_chaos_seeds_that_once_failed(seed):
    # 10737: a queued stream's clients left while its grant was on the way; the call it
    # opened finished before the Coalescer's FailStream arrived, and the Coalescer's
    # LeaseCancel reached the Pacer before the Pool's LeaseRelease (both legitimate).
    # 21945: two local flights of one edge ended up on one stream; when one left, the
    # edge's single hub listener per stream cut the other off (a client waited forever).
    sim = chaos(seed)
    sim.run()
    assert sim.quiescent


@pytest.mark.parametrize("seed", [237, 344, 926, 1019], ids=ids)
def test_crash_chaos_seeds_that_once_failed(seed):
    # 237: the Pool died while the Coalescer's FailStream(cancelled) was on its way to it,
    # and the Pacer (paused, its backlog running at once) granted the lease before it saw
    # the LeaseCancel: the new Pool ran the call nobody listened to, without a lease. The
    # Pacer now follows such a LeaseCancel with a FailStream of its own.
    # 344: a client that never ended (two kills close together); passes since restarted
    # shards count their own stream ids (no stream id reused across shard incarnations).
    # 926 (and 1049, 1212, 1458, 1468, 1490, 1583): the checker kept one dead hub per stream
    # id, so a second Pool kill overwrote what the first had published (a harness artifact;
    # the simulated Pool now runs the real HubLogic and keeps every incarnation's record).
    # 1019: a Pacer restarted after a Pool replacement it never heard of (the harness built
    # it at the crash with the old Pool's address); it is now wired with the directory of
    # its restart, as actors/pacer.py is. Its leases of the first Pool leaked at the kill.
    sim = chaos(seed, kills=3)
    sim.run()
    assert sim.quiescent


@pytest.mark.parametrize("seed", seeds(60), ids=ids)
def test_crashes_of_pool_pacer_and_shards_keep_the_invariants(seed):
    # The checker at quiescence: no lease held, no flight kept, every client ended once;
    # and at every MemberLost: nothing of the dead Pool survives in the Pacer or a shard.
    sim = chaos(seed, kills=3)
    sim.run()
    assert sim.quiescent
    # "cancelled": a stream of a dead shard, failed by the Pacer (the Pool aborts its call)
    assert all(c.outcome in ("done", "error", "rejected", "disconnected", "cancelled") for c in sim.clients)


# --- several Pools (SLUICE_POOLS) ---------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(12), ids=ids)
def test_two_pools_under_chaos_and_kills_keep_the_invariants(seed):
    # Kills of either Pool among the others; the checker adds: a stream ran on one Pool, and
    # every client of it listened at that Pool's hub.
    sim = chaos(seed, kills=3, pools=2)
    sim.run()
    assert sim.quiescent
    assert all(c.outcome in ("done", "error", "rejected", "disconnected", "cancelled") for c in sim.clients)


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_calls_spread_over_both_pools_and_identical_ones_stay_one(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=50, concurrency=50), pools=2)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=10)
    distinct = [sim.client(at=sim.rng.uniform(0, 0.1), text=f"q{i}", edge=f"e{i % 3 + 1}") for i in range(20)]
    same = [sim.client(at=0.2 + sim.rng.uniform(0, 0.05), text="same", edge=f"e{i % 3 + 1}") for i in range(20)]
    sim.run()
    assert {c.outcome for c in distinct + same} == {"done"}
    assert sim.upstream_calls == 21
    assert [p.calls for p in sim.pools] in ([10, 11], [11, 10])  # least loaded: they alternate
    assert len({c.text for c in same}) == 1


@pytest.mark.parametrize("lease_slice", [0, 8])
@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_calls_run_on_a_pool_of_the_host_their_first_client_came_to(seed, lease_slice):
    # Pool locality (docs/scale-out.md): hosts A and B, two Pools and an edge each. With
    # lease slices a shard's grants are on one host's Pools: it uses them only for requests
    # that arrived there.
    hosts = {"pool": "A", "pool:1": "A", "e1": "A", "pool:2": "B", "pool:3": "B", "e2": "B"}
    pacer = PacerSettings(rps=100, burst=100, concurrency=100)
    sim = Simulation(seed=seed, pacer=pacer, pools=4, hosts=hosts, lease_slice=lease_slice)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=10)
    distinct = [sim.client(at=sim.rng.uniform(0, 0.2), text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(12)]
    # Identical requests at both hosts: one call, on the first one's host; the others listen there.
    same = [sim.client(at=0.5 + 0.02 * i, text="same", edge=("e2", "e1")[i % 2]) for i in range(6)]
    sim.run()
    assert {c.outcome for c in distinct + same} == {"done"}
    for c in distinct:
        assert hosts[c.flight.hub or "pool"] == hosts[c.edge.removeprefix("edge:")], c.request_id
    assert {hosts[c.flight.hub] for c in same} == {"B"} and sim.upstream_calls == 13
    assert all(p.calls >= 2 for p in sim.pools), "each host's calls still spread over its Pools"
    sliced = [d for d in sim.messages(m.OpenStream) if roles.is_coalescer(d.src.partition("@")[0])]
    assert bool(sliced) == bool(lease_slice), "calls opened from slices (with slices only)"


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_a_host_whose_pool_is_down_has_its_calls_run_elsewhere(seed):
    hosts = {"pool": "A", "e1": "A", "pool:1": "B", "e2": "B"}
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=100, burst=100, concurrency=100), pools=2, hosts=hosts)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=5)
    sim.kill("pool:1", at=0.1, restart_s=1.0)
    during = [sim.client(at=0.3 + 0.05 * i, text=f"during{i}", edge="e2") for i in range(4)]
    after = [sim.client(at=2.0 + 0.05 * i, text=f"after{i}", edge="e2") for i in range(4)]
    sim.run()
    assert {c.outcome for c in during + after} == {"done"}
    assert {c.flight.hub for c in during} == {"pool"}  # B has no Pool up: not waited for
    assert {c.flight.hub for c in after} == {"pool:1"}  # B's replacement Pool is up again


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_pacing_stays_exact_across_two_pools(seed):
    settings = PacerSettings(rps=1, burst=1, concurrency=3)
    sim = Simulation(seed=seed, pacer=settings, pools=2)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=5)
    clients = [sim.client(at=sim.rng.uniform(0, 0.5), text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(6)]
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 6
    assert all(p.calls >= 2 for p in sim.pools)
    granted = [t for t, _ in sim.grants()]
    assert all(b - a >= 1.0 - EPS for a, b in zip(granted, granted[1:])), granted  # <= 1 call a second
    opened = sorted(call.opened_at for p in sim.pools for call in p.log)  # give or take the hops' jitter
    assert all(b - a >= 1.0 - 2 * HI_MS / 1000 for a, b in zip(opened, opened[1:])), opened
    assert_grants_match_reference(sim, settings)


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_a_killed_pool_takes_only_its_own_streams(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=50, concurrency=20), pools=2)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=50)  # 1.1 s: running at the kill
    clients = [sim.client(at=sim.rng.uniform(0, 0.2), text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(12)]
    sim.kill("pool", at=0.5, restart_s=0.3)
    sim.run(until=0.9, check=False)
    state = sim.pacer.state(sim.now)
    assert state["pools"]["pool"]["in_flight"] == 0, "the dead Pool's leases are back"
    assert state["pools"]["pool:1"]["in_flight"] == 6, "the other Pool's are not touched"
    later = [sim.client(at=1.0 + 0.01 * i, text=f"new{i}", edge="e1") for i in range(4)]
    sim.run()
    on = {c.request_id: c.flight.hub or "pool" for c in clients}
    lost = [c for c in clients if on[c.request_id] == "pool"]
    kept = [c for c in clients if on[c.request_id] == "pool:1"]
    assert len(lost) == len(kept) == 6
    assert {c.error["code"] for c in lost} == {"hub_disconnected"}
    assert {c.outcome for c in kept} == {"done"} and all(not c.hub_lost for c in kept)
    assert {c.outcome for c in later} == {"done"}


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_requests_queued_for_a_killed_pool_are_ended_and_the_queue_goes_on(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=1, burst=1, concurrency=1), pools=2)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=10)
    clients = [sim.client(at=0.01 * i, text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(6)]  # 1 runs, 5 queue
    sim.kill("pool:1", at=0.5, restart_s=0.3)
    sim.run()
    queued_on_dead = [c for c in clients if (c.flight.hub or "pool") == "pool:1"]
    assert queued_on_dead and {c.outcome for c in queued_on_dead} == {"error"}
    assert {c.outcome for c in clients if c not in queued_on_dead} == {"done"}


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_coalescing_switched_off_and_on_keeps_the_invariants(seed):
    # The edge follows the Coalescer's last Admitted.coalesce (edge/flights.py): switched off,
    # then on, an edge submits a second flight for a key the shard joins to the running
    # stream, so two local flights listen to one stream (the situation of seed 21945).
    sim = chaos(seed, flips=4)
    sim.run()
    assert sim.quiescent


def test_one_listener_per_stream_is_found_by_coalescing_flips(monkeypatch):
    # The bug of commit 08751be, put back: the edge's hub client keeps one listener per
    # stream, so a second local flight on a stream replaces the first. The real flight logic
    # in the simulated edges, with coalescing switched off and on, must find it.
    import sim.harness
    from edge.listeners import Listeners

    class OneListenerPerStream(Listeners):
        def add(self, stream_id, listener):
            self._by_stream[stream_id] = [listener]

    monkeypatch.setattr(sim.harness, "Listeners", OneListenerPerStream)
    failed, shared = [], 0
    for seed in range(20):
        s = chaos(seed, flips=4)
        try:
            s.run()
        except SimulationError:
            failed.append(seed)
        shared += sum(e.shared_listens for e in s.edges.values())
    assert shared, "no run put two local flights on one stream"
    assert failed, "no seed noticed a flight cut off from its stream"


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_a_killed_pool_gives_back_its_leases_and_forgets_its_flights(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=10, burst=10, concurrency=3))
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=50)  # 1.1 s: running at the kill
    killed = [sim.client(at=sim.rng.uniform(0, 0.2), text=f"q{i % 5}", edge=f"e{i % 2 + 1}") for i in range(20)]
    sim.kill("pool", at=0.5, restart_s=0.3)
    sim.run(until=0.9, check=False)
    assert sim.pacer.state(sim.now)["in_flight"] == 0, "the dead Pool's leases are back"
    assert all(not lg.by_key for lg in sim.coalescers), "no flight of the dead Pool is kept"
    assert all(not lg.errors for lg in sim.coalescers), "nor remembered as an error"
    same = [sim.client(at=1.0 + sim.rng.uniform(0, 0.1), text=f"q{i}", edge="e1") for i in range(5)]
    sim.run()
    assert {c.outcome for c in killed} == {"error"} and {c.error["code"] for c in killed} == {"hub_disconnected"}
    assert {c.outcome for c in same} == {"done"}, "the same prompts start fresh calls"
    assert all(c.events[0]["first_byte_at"] > 0.8 for c in same)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_flights_waiting_at_a_killed_pacer_ask_its_replacement(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=10, burst=10, concurrency=1))
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=20)
    clients = [sim.client(at=0.01 * i, text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(4)]  # 1 runs, 3 queue
    sim.kill("pacer:simulated", at=0.2, restart_s=0.3)
    sim.run()
    assert [c.outcome for c in clients] == ["done"] * 4
    assert sim.pool.calls == 4 and sim.count()["LeaseRequest"] >= 4 + 3  # the queued three asked again


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_a_killed_shard_loses_its_flights_but_no_lease_and_no_client(seed):
    sim = Simulation(seed=seed, shards=2, pacer=PacerSettings(rps=10, burst=10, concurrency=2))
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=20)
    before = [sim.client(at=0.01 * i, text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(6)]
    sim.kill("coalescer:0", at=0.2, restart_s=0.3)
    after = [
        sim.client(at=0.25 + 0.01 * i, text=f"new q{i}", edge="e1") for i in range(6)
    ]  # some wait for the replacement
    sim.run()  # the checker: the Pacer holds nothing, every client ended once
    assert {c.outcome for c in after} == {"done"}
    # The dead shard's flights fail with coalescer_lost (queued: the Pacer fails them;
    # running: the Pool aborts the call and says why); the other shard's are untouched.
    lost = [c for c in before if c.outcome != "done"]
    assert lost and all(c.error["code"] == "coalescer_lost" for c in lost)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_a_re_ask_the_new_pacer_refuses_on_arrival_ends_the_stream_its_clients_hear(seed):
    # Found by the crash chaos (seeds 51, 104, 134, ...: clients ended stream_not_started
    # after 68 s): a flight queued at a killed Pacer, its clients admitted and listening,
    # is asked again and the new Pacer refuses it as it arrives (its queue full, or every
    # key paused past the longest wait). Only a refusal from the queue ended the stream;
    # the shard rejects only clients still waiting for its answer, so these heard nothing.
    sim = Simulation(seed=seed, shards=2, pacer=PacerSettings(rps=10, burst=10, concurrency=1, max_queue=10))
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=20)  # 0.5 s a call: 1 runs, 3 queue
    clients = [sim.client(at=0.01 * i, text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(4)]
    sim.configure_pacer(at=0.1, max_queue=1)  # the new Pacer starts with it: 1 re-ask granted, 1 queued, 1 refused
    sim.kill("pacer:simulated", at=0.2, restart_s=0.3)
    sim.run()
    refused = [c for c in clients if c.outcome != "done"]
    assert len(refused) == 1, [(c.outcome, c.error) for c in clients]
    assert refused[0].error["code"] == "pacer_queue_full" and refused[0].ended_at < 1.0, refused[0].events


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_a_re_ask_the_new_pacer_finds_doomed_on_arrival_ends_the_stream_its_clients_hear(seed):
    # The other refusal on arrival (pacer_queue_timeout at once): the new Pacer's bucket
    # starts full and it counts none of the calls still running, so it grants re-asks
    # until its token is spent, and the next one could only be granted long after its
    # wait (RPS 0.01: a token in 100 s, MAX_WAIT 30 s). The dead Pacer queued them on its
    # concurrency (a release may come any moment), so it refused none of them itself.
    sim = Simulation(seed=seed, shards=2, pacer=PacerSettings(rps=10, burst=1, concurrency=2, max_wait_s=30))
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=20)  # 0.5 s a call: 2 run at the kill, 2 queue
    clients = [sim.client(at=at, text=f"q{i}", edge=f"e{i % 2 + 1}") for i, at in enumerate([0.0, 0.12, 0.14, 0.15])]
    sim.configure_pacer(at=0.17, rps=0.01)  # the new Pacer starts with it
    sim.kill("pacer:simulated", at=0.2, restart_s=0.3)
    sim.run()
    refused = [c for c in clients if c.outcome != "done"]
    assert len(refused) == 1 and refused[0] in clients[2:], [(c.outcome, c.error) for c in clients]
    assert refused[0].error["code"] == "pacer_queue_timeout" and refused[0].ended_at < 1.0, refused[0].events


@pytest.mark.parametrize("gap_s", [0.0, 0.005, -0.005], ids=["together", "pacer-first", "shard-first"])
@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_a_pacer_killed_with_a_shard_leaves_no_client_of_its_queue_waiting(seed, gap_s):
    # The double crash of docs/reliability.md: the shard's queued flights were known only
    # to it and to the Pacer. The Pools hear the shard's death and end the streams it left
    # unopened (coalescer_lost); before, their clients waited for the hub's orphan timeout
    # (PACER_MAX_WAIT + 60 s) and got stream_not_started.
    sim = Simulation(seed=seed, shards=2, pacer=PacerSettings(rps=20, burst=20, concurrency=2))
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=20)  # 0.5 s a call: 2 run, the rest queue
    before = [sim.client(at=0.01 * i, text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(8)]
    followers = [sim.client(at=0.15, text=f"q{i}", edge=f"e{(i + 1) % 2 + 1}") for i in range(8)]
    kill_at = 0.2
    sim.kill("pacer:simulated", at=kill_at + max(gap_s, 0.0), restart_s=0.3)
    sim.kill("coalescer:0", at=kill_at + max(-gap_s, 0.0), restart_s=0.3)
    again = [sim.client(at=1.5, text=f"q{i}", edge="e1") for i in range(8)]  # the same prompts, afresh
    sim.run()  # the checker: the Pacer holds nothing, every client ended exactly once
    clients = before + followers
    queued = {call.stream_id for call in sim.pool.log if call.opened_at > kill_at}
    running = {call.stream_id for call in sim.pool.log if call.opened_at <= kill_at}
    assert all(c.outcome == "done" for c in clients if c.stream_id in running), "running calls go on"
    lost = [c for c in clients if c.outcome != "done"]
    assert lost, "some flight of the dead shard was queued at the dead Pacer"
    for c in lost:  # only the dead shard's, each with one clear error, soon after the kill
        assert c.flight.shard == "coalescer:0" and c.error["code"] == "coalescer_lost"
        assert c.ended_at < kill_at + 1.0, f"{c.request_id} ended at {c.ended_at}"
        assert c.stream_id not in queued
    assert all(c.outcome == "done" for c in clients if c.flight.shard == "coalescer:1")
    assert [c.outcome for c in again] == ["done"] * 8


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_a_paused_pool_delays_but_completes_every_stream(seed):
    sim = Simulation(seed=seed)
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    clients = [sim.client(at=sim.rng.uniform(0, 0.1), text="q", edge=f"e{i % 2 + 1}") for i in range(20)]
    sim.pause("pool", at=0.3, for_s=1.5)
    sim.run()
    assert sim.pool.calls == 1 and {c.outcome for c in clients} == {"done"}
    assert sim.pool.log[0].ended_at >= 1.8
    assert {c.text for c in clients} == {full_text(1, 10)}


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_metrics_see_leaders_followers_and_cancel_latency(seed):
    sim = Simulation(seed=seed, metrics=True)
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10)
    sim.burst(20, spread_s=0.05, text="a", edge="e1")
    sim.burst(3, at=1.0, text="b", edge="e2", disconnect_at=1.3)
    sim.run()
    report = sim.metrics.logic.performance(100, sim.now)
    assert report["coalesce"] == {"leaders": 2, "followers": 21}
    assert report["cancel_ms"]["count"] == 1 and report["cancel_ms"]["p99"] <= 2 * HI_MS
    assert report["error_rate"] == 0.0 and sim.metrics.logic.rejected_records == 0
    # the Pool's own records, from the real PoolLogic: its two calls, and its gauge back to 0
    records = [r for d in sim.messages(m.Records, src="pool") for r in d.msg.records]
    assert sorted(r["outcome"] for r in records if r["kind"] == "upstream") == ["cancelled", "done"]
    assert report["active_streams"] == 0


def rejoin(seed):
    """e1's only client leaves a stream that e2 keeps alive, and a new identical client
    arrives on e1 at once: e1 unsubscribes and subscribes the same stream again while
    frames of the first subscription are still on the wire."""
    sim = Simulation(seed=seed, latency_ms=(0.1, 10.0))
    sim.upstream(ttft_ms=50, token_interval_ms=1, tokens=200)
    sim.client(at=0.0, text="q", edge="e2")
    sim.client(at=0.001, text="q", edge="e1", disconnect_at=0.1)
    again = sim.client(at=0.1, text="q", edge="e1")
    sim.run()
    assert again.outcome == "done" and again.text == full_text(1, 200)


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_rejoining_a_stream_on_the_same_edge_sees_each_event_once(seed):
    rejoin(seed)


def test_frames_of_an_earlier_subscription_break_a_rejoin_without_the_seq_rule(monkeypatch):
    # The edge's rule (edge.listeners.new_events, run by the real EdgeFlights in the simulated
    # edges) is what keeps the rejoin above correct: taking every frame's events as new fails it.
    import edge.flights
    import edge.listeners

    monkeypatch.setattr(edge.flights, "new_events", lambda have, seq, events: events)
    failed = []
    for seed in range(30):
        try:
            rejoin(seed)
        except (AssertionError, SimulationError):
            failed.append(seed)
    assert failed, "no seed noticed duplicated frames"
    assert edge.listeners.new_events(2, 3, ["x"]) == [] and edge.listeners.new_events(2, 1, ["a", "b"]) == ["b"]


# --- the harness itself -----------------------------------------------------------------------


def test_the_documented_example():
    sim = Simulation(
        seed=7,
        shards=2,
        pacer=PacerSettings(rps=1, burst=2, concurrency=3),
        flags=CoalescerFlags(),
        latency_ms=(0.5, 2.0),
    )
    sim.upstream(ttft_ms=200, token_interval_ms=20, tokens=10, fail=None)
    c = sim.client(at=0.0, text="hi", edge="e1", disconnect_at=None)
    sim.run(until=60.0)
    assert sim.quiescent  # so the invariants were checked
    assert sim.pool.calls == 1 and c.outcome == "done"


def test_a_seed_from_the_environment_replays_one_run(monkeypatch):
    monkeypatch.setenv("SLUICE_SIM_SEED", "4242")
    assert seeds(50) == [4242]
    assert Simulation().seed == 4242
    monkeypatch.delenv("SLUICE_SIM_SEED")
    assert seeds(3) == [0, 1, 2]


@pytest.mark.parametrize("seed", seeds(5), ids=ids)
def test_same_seed_same_run(seed):
    def fingerprint(sim):
        return [(d.sent_at, d.delivered_at, d.src, d.dst, d.msg) for d in sim.trace]

    a, b = chaos(seed).run(), chaos(seed).run()
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(chaos(seed + 1000).run())


def test_a_message_the_codec_cannot_carry_fails_the_run_with_its_seed():
    sim = Simulation(seed=123)
    sim.client(
        at=0.0, body={"messages": [{"role": "user", "content": "hi"}], "user": 2**70}
    )  # JSON (the key) but no msgpack int
    with pytest.raises(SimulationError, match=r"seed=123.*does not encode"):
        sim.run()


def test_a_broken_invariant_names_the_seed():
    sim = Simulation(seed=99)
    sim.upstream(ttft_ms=10, tokens=1)
    c = sim.client(at=0.0)
    sim.run()
    c.outcomes.append("done")  # as if the client had ended twice
    with pytest.raises(SimulationError, match=r"(?s)\[seed=99\].*SLUICE_SIM_SEED=99"):
        sim.check_invariants()
