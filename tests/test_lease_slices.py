"""Lease slices (SLUICE_LEASE_SLICE): the Pacer hands shards grants ahead of demand, and
the account's limits still hold exactly (docs/architecture.md, "Lease slices").

Simulation runs of the real PacerLogic / CoalescerLogic / PoolLogic (sim/harness.py), one
test per exactness rule, each of which fails when its rule is broken; the circuit rules
drive PacerLogic directly (the simulated Pool reports no key verdicts).
"""

from __future__ import annotations

import pytest

from actors.circuit import OPEN, CircuitSettings
from actors.pacer_logic import PacerLogic, PacerSettings, Tick
from protocols import messages as m
from protocols import roles
from protocols.effects import Send
from protocols.keys import coalescing_key, shard_of
from sim.harness import Simulation, Upstream, chaotic_upstream, seeds

pytestmark = pytest.mark.simulation

PACER = "pacer:simulated"


def ids(seed):
    return f"seed={seed}"


def text_on(shard: int, shards: int = 2, prefix: str = "t") -> str:
    """A request text whose coalescing key lands on `shard` (as the edge picks it)."""
    for i in range(10_000):
        text = f"{prefix}{i}"
        body = {"messages": [{"role": "user", "content": text}]}
        if shard_of(coalescing_key("simulated", "sim-1", body), shards, "") == shard:
            return text
    raise AssertionError("no text found")


def texts_on(shard: int, n: int, shards: int = 2, prefix: str = "t") -> list[str]:
    return [text_on(shard, shards, f"{prefix}{j}-") for j in range(n)]


def sliced_calls(sim) -> list[str]:
    """Stream ids of the calls a shard opened from its slice."""
    return [d.msg.stream_id for d in sim.messages(m.OpenStream) if roles.is_coalescer(d.src.partition("@")[0])]


def call_times(sim) -> list[float]:
    """When each call took its grant: the Pacer's grant, or the shard's use of a slice grant."""
    return [t for t, _ in sim.grants()]


def assert_bucket_bound(times: list[float], rps: float, burst: int) -> None:
    """Any window [t_i, t_j] holds at most BURST + RPS * (t_j - t_i) calls."""
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rps * (times[j] - times[i]) + 1e-6, (i, j, times[i], times[j])


def workload(sim, n: int, spread_s: float, shards: int = 2) -> list:
    return [sim.client(at=sim.rng.uniform(0, spread_s), text=f"q{i}", edge=f"e{i % shards + 1}") for i in range(n)]


# --- the steady state -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_a_slice_takes_the_pacer_off_the_request_path(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=100, burst=50, concurrency=50), lease_slice=8)
    sim.upstream(ttft_ms=100, token_interval_ms=10, tokens=5)
    clients = [sim.client(at=0.02 * i, text=f"q{i}", edge=f"e{i % 2 + 1}") for i in range(200)]
    sim.run()
    assert {c.outcome for c in clients} == {"done"}
    counts = sim.count()
    # Two shards: each asks once, then lives on its slice, refilled in batches.
    assert counts["LeaseRequest"] <= 4 and len(sliced_calls(sim)) >= 195
    assert counts["SliceGrant"] + counts["SliceReport"] <= 200 // 2
    assert counts["LeaseGranted"] == counts["LeaseRequest"]


@pytest.mark.parametrize("seed", seeds(5), ids=ids)
def test_a_trickle_of_requests_is_cut_no_slice(seed):
    # A shard that asks now and then would give a slice back unused: 9 messages, not 7.
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=100, burst=50, concurrency=50), lease_slice=8)
    sim.upstream(ttft_ms=100, token_interval_ms=10, tokens=5)
    clients = [sim.client(at=3.0 * i, text=f"q{i}", edge="e1") for i in range(6)]
    sim.run()
    assert {c.outcome for c in clients} == {"done"}
    counts = sim.count()
    assert not any(name.startswith("Slice") for name in counts) and counts["LeaseRequest"] == 6


@pytest.mark.parametrize("seed", seeds(5), ids=ids)
def test_slice_zero_is_todays_path(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=100, burst=50, concurrency=50), lease_slice=0)
    sim.upstream(ttft_ms=100, token_interval_ms=10, tokens=5)
    workload(sim, 50, 1.0)
    sim.run()
    counts = sim.count()
    assert not any(name.startswith("Slice") for name in counts)
    assert counts["LeaseRequest"] == counts["OpenStream"] == 50 and not sliced_calls(sim)


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_low_limits_pace_exactly_as_without_slices(seed):
    # RPS=1, BURST=1: no surplus, so no slice is ever cut; the run is today's, grant for grant.
    runs = []
    for lease_slice in (0, 8):
        sim = Simulation(
            seed=seed, pacer=PacerSettings(rps=1, burst=1, concurrency=3, max_wait_s=60), lease_slice=lease_slice
        )
        sim.upstream(ttft_ms=100, token_interval_ms=10, tokens=5)
        workload(sim, 8, 0.5)
        sim.run()
        runs.append(sim.grants())
    assert runs[0] == runs[1]
    assert all(b[0] - a[0] >= 1.0 - 1e-6 for a, b in zip(runs[1], runs[1][1:]))


# --- rule 1: the bucket -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(30), ids=ids)
def test_calls_never_exceed_what_rps_and_burst_allow(seed):
    settings = PacerSettings(rps=5, burst=10, concurrency=50, max_wait_s=60)
    sim = Simulation(seed=seed, pacer=settings, lease_slice=4)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    clients = workload(sim, 60, 6.0)
    # bursts now and then, so that shards hold slices when others arrive
    clients += [sim.client(at=3.0 + 0.001 * i, text=f"b{i}", edge=f"e{i % 2 + 1}") for i in range(10)]
    sim.run()
    assert {c.outcome for c in clients} == {"done"}
    assert sliced_calls(sim), "the workload used slices"
    assert_bucket_bound(call_times(sim), settings.rps, settings.burst)
    for bucket in sim.pacer.buckets:
        assert bucket.held == 0 and bucket.outstanding == 0


# --- rule 2: requests per minute ---------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_never_more_than_rpm_calls_in_a_minute(seed):
    settings = PacerSettings(rps=20, burst=10, concurrency=20, rpm=8, max_wait_s=300)
    sim = Simulation(seed=seed, pacer=settings, lease_slice=4)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    clients = workload(sim, 20, 2.0)
    sim.run()
    assert {c.outcome for c in clients} == {"done"}
    assert sliced_calls(sim)
    times = call_times(sim)
    assert len(times) == 20
    for i in range(len(times)):
        assert sum(1 for t in times if times[i] - 60.0 + 1e-6 < t <= times[i]) <= 8


# --- rule 3: concurrency ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_in_flight_and_held_never_exceed_concurrency(seed):
    settings = PacerSettings(rps=50, burst=50, concurrency=5, max_wait_s=60)
    sim = Simulation(seed=seed, pacer=settings, lease_slice=4)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=10)
    peak = {"leases": 0}

    def watch(s):
        peak["leases"] = max(peak["leases"], len(s.pacer.in_flight))
        if s.now < 8.0:
            s.at(s.now + 0.005, watch)

    sim.at(0.0, watch)
    clients = workload(sim, 40, 3.0)
    sim.run()
    assert {c.outcome for c in clients} == {"done"}
    assert sliced_calls(sim)
    assert peak["leases"] <= 5
    calls = [c for pool in sim.pools for c in pool.log]
    for call in calls:  # running at the Pool, whatever their grant
        running = sum(1 for o in calls if o.opened_at <= call.opened_at < o.ended_at)
        assert running <= 5


# --- rule 4: FIFO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_a_queued_request_is_not_overtaken_by_a_slice(seed):
    settings = PacerSettings(rps=2, burst=6, concurrency=10, max_wait_s=60)
    sim = Simulation(seed=seed, pacer=settings, lease_slice=4, latency_ms=(0.5, 1.0))
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    a = texts_on(0, 3, prefix="a")
    b = texts_on(1, 2, prefix="b")
    sim.client(at=0.0, text=a[0], edge="e1")  # granted
    sim.client(at=0.05, text=a[2], edge="e1")  # granted, and shard 0 (asking again) gets a slice
    sim.client(at=0.1, text=b[0], edge="e2")  # granted from the bucket
    queued = sim.client(at=0.2, text=b[1], edge="e2")  # must queue: shard 0 holds the tokens
    later = sim.client(at=0.25, text=a[1], edge="e1")  # shard 0 was asked to give its slice back
    sim.run()
    assert sim.messages(m.SliceRecall), "queueing recalls the slices"
    assert queued.outcome == later.outcome == "done"
    granted = {sid: t for t, sid in sim.grants()}
    assert granted[queued.stream_id] < granted[later.stream_id]
    assert later.stream_id not in sliced_calls(sim)


# --- rule 5: circuits and 429 pauses -------------------------------------------------------------


def _pacer_with_slices() -> tuple[PacerLogic, list]:
    pacer = PacerLogic(
        "simulated",
        PacerSettings(rps=100, burst=20, concurrency=20),
        keys=2,
        circuit=CircuitSettings(failures=2, open_s=10.0),
        slice_size=4,
        me=PACER,
    )
    # A shard is cut a slice when it asks twice within SLICE_DEMAND_S.
    pacer.handle(m.LeaseRequest("s-0", "simulated", 0.0, "sim-1", {}, "coalescer:0"), "coalescer:0", 0.0)
    out = pacer.handle(m.LeaseRequest("s-1", "simulated", 0.0, "sim-1", {}, "coalescer:0"), "coalescer:0", 0.0)
    grants = [g for e in out if isinstance(e, Send) and isinstance(e.msg, m.SliceGrant) for g in e.msg.grants]
    return pacer, grants


def _sent(out: list, kind: type) -> list:
    return [e.msg for e in out if isinstance(e, Send) and isinstance(e.msg, kind)]


def test_a_circuit_that_opens_recalls_the_slices_and_no_slice_goes_out_on_it():
    pacer, grants = _pacer_with_slices()
    assert len(grants) == 4 and {g[1] for g in grants} == {0, 1}
    out: list = []
    for i, lease in enumerate(["s-1", grants[0][0]]):
        out += pacer.handle(m.LeaseRelease(lease, None, [[0, False]]), None, 0.1 * (i + 1))
    assert pacer.buckets[0].circuit.state == OPEN
    assert _sent(out, m.SliceRecall) == [m.SliceRecall(PACER)]
    # The shard gives back what it held; asked again, it gets grants on the closed key only.
    held = [g[0] for g in grants[1:]]
    out = pacer.handle(m.SliceReport("coalescer:0", [], held, True), "coalescer:0", 0.3)
    again = [g for msg in _sent(out, m.SliceGrant) for g in msg.grants]
    assert again and {g[1] for g in again} == {1}
    # Half-open: still no slice on it (its probe goes the usual way).
    pacer.handle(m.SliceReport("coalescer:0", [], [g[0] for g in again], False), "coalescer:0", 0.4)
    pacer.handle(Tick(0), None, 11.0)
    assert pacer.buckets[0].circuit.state == "half_open"
    out = pacer.handle(m.SliceReport("coalescer:0", [], [], True), "coalescer:0", 11.0)
    assert {g[1] for msg in _sent(out, m.SliceGrant) for g in msg.grants} == {1}


def test_a_429_pause_recalls_the_slices():
    pacer, grants = _pacer_with_slices()
    out = pacer.handle(m.AccountPause("simulated", 2.0, 0), None, 0.1)
    assert _sent(out, m.SliceRecall) == [m.SliceRecall(PACER)]
    pacer.handle(m.SliceReport("coalescer:0", [], [g[0] for g in grants], False), "coalescer:0", 0.2)
    out = pacer.handle(m.LeaseRelease("s-1", 1.0), None, 0.3)  # a Retry-After at the end of a call
    out = pacer.handle(m.SliceReport("coalescer:0", [], [], True), "coalescer:0", 0.4)
    assert all(g[1] != 0 for msg in _sent(out, m.SliceGrant) for g in msg.grants), "not on the paused key"


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_an_upstream_429_with_retry_after_recalls_slices_in_the_simulation(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=20, concurrency=20), lease_slice=4)
    sim.upstream(lambda req: Upstream(ttft_ms=50, fail=429, retry_after_s=2.0) if req.n == 3 else Upstream(50, 10, 3))
    clients = workload(sim, 20, 0.5)
    sim.run()
    recall_at = min(d.sent_at for d in sim.messages(m.SliceRecall))
    # Nothing opened from a slice during the pause, after the recall reached the shards.
    pause_end = recall_at + 2.0 - 0.01
    assert not [t for t, sid in sim.grants() if sid in sliced_calls(sim) and recall_at + 0.01 < t < pause_end]
    assert {c.outcome for c in clients} <= {"done", "error"}


# --- rule 6: dead holders, a replaced Pacer -------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_a_dead_shards_slice_comes_back_at_once(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=20, concurrency=10), lease_slice=4)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    sim.client(at=0.0, text=text_on(0), edge="e1")
    sim.client(at=0.05, text=text_on(0, prefix="u"), edge="e1")  # asking again: a slice
    sim.kill("coalescer:0", at=0.5, restart_s=0.2)
    sim.run(until=0.45, check=False)
    assert any(h.asker == "coalescer:0" and h.sliced == "held" for h in sim.pacer.in_flight.values())
    sim.run(until=1.0, check=False)
    lost = [d for d in sim.messages(m.MemberLost, dst=PACER) if d.msg.role == "coalescer:0"]
    assert lost and lost[0].delivered_at is not None
    assert not any(h.asker == "coalescer:0" for h in sim.pacer.in_flight.values())
    later = [sim.client(at=1.0 + 0.01 * i, text=f"n{i}", edge="e1") for i in range(10)]
    sim.run()
    assert {c.outcome for c in later} == {"done"}


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_shards_drop_the_slices_of_a_replaced_pacer(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=20, concurrency=10), lease_slice=4)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    for i, t in enumerate((0.0, 0.05)):
        sim.client(at=t, text=text_on(0, prefix=f"v{i}"), edge="e1")
        sim.client(at=t, text=text_on(1, prefix=f"v{i}"), edge="e2")
    sim.kill(PACER, at=0.5, restart_s=0.2)
    later = [sim.client(at=0.8 + 0.05 * i, text=f"n{i}", edge=f"e{i % 2 + 1}") for i in range(20)]
    sim.run()
    assert {c.outcome for c in later} == {"done"}
    told = {d.dst: d.delivered_at for d in sim.messages(m.MemberLost) if d.msg.role == PACER}
    assert told, "the shards heard of the dead Pacer"
    for d in sim.messages(m.OpenStream):
        shard = d.src
        if roles.is_coalescer(shard.partition("@")[0]) and shard in told and d.sent_at > told[shard]:
            assert not d.msg.lease_id.startswith("g-1."), f"{shard} used a dead Pacer's grant"
    for logic in sim.coalescers:
        assert all(g.pacer != PACER for e in logic.slices.by_pacer.values() for g in e.grants)


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_a_grant_on_a_dead_pool_does_not_open_a_call_at_its_replacement(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=20, concurrency=10), lease_slice=4)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    sim.client(at=0.0, text=text_on(0), edge="e1")
    sim.client(at=0.05, text=text_on(0, prefix="u"), edge="e1")  # shard 0 gets a slice on "pool"
    sim.kill("pool", at=0.5, restart_s=0.1)
    sim.slow_link("supervisor", "coalescer:0", 500)  # shard 0 hears of the death late
    late = sim.client(at=0.7, text=text_on(0, prefix="w"), edge="e1")  # the replacement is up
    sim.run()
    assert late.stream_id in sliced_calls(sim), "it used a grant cut on the dead Pool"
    assert late.outcome == "error" and late.error["code"] == "pool_lost"
    assert late.stream_id not in {c.stream_id for c in sim.pool.log}, "no call ran uncounted"


# --- what the Pacer counts: a grant in use is in flight on its Pool ------------------------------


def _pool_counts(pacer: PacerLogic, now: float) -> dict:
    return {role: (p["in_flight"], p["held"]) for role, p in pacer.state(now)["pools"].items()}


def test_a_grant_its_pool_says_is_used_counts_in_flight_there_before_the_shard_reports():
    pacer, grants = _pacer_with_slices()
    g = [grant[0] for grant in grants]
    assert _pool_counts(pacer, 0.0) == {"pool": (2, 4)}  # s-0 and s-1 granted; four held
    # The Pool opened a call with g0 (SliceOpened), then with g1 (told in a release).
    pacer.handle(m.SliceOpened("pool", [g[0]]), "pool", 0.1)
    assert _pool_counts(pacer, 0.1) == {"pool": (3, 3)}
    pacer.handle(m.LeaseRelease("s-0", None, None, [g[1]]), "pool", 0.2)
    assert _pool_counts(pacer, 0.2) == {"pool": (3, 2)}
    assert pacer.state(0.2)["in_flight"] == 3 and pacer.state(0.2)["slices"] == {"coalescer:0": 2}
    # Each counted used once: its token spent, its per-minute place stamped at the first word.
    assert sum(b.held for b in pacer.buckets) == 2 and sum(b.outstanding for b in pacer.buckets) == 2
    stamped = sorted(t for b in pacer.buckets for t in b.recent_grants)
    # The shard's report of the same two comes later and changes nothing.
    pacer.handle(m.SliceReport("coalescer:0", [g[0], g[1]], [], False), "coalescer:0", 0.3)
    assert _pool_counts(pacer, 0.3) == {"pool": (3, 2)}
    assert sorted(t for b in pacer.buckets for t in b.recent_grants) == stamped
    assert sum(b.held for b in pacer.buckets) == 2
    # Word of a lease that is no slice grant, or gone, changes nothing either.
    pacer.handle(m.SliceOpened("pool", ["s-1", "nobody"]), "pool", 0.4)
    assert _pool_counts(pacer, 0.4) == {"pool": (3, 2)}


def test_a_dead_pools_used_and_held_grants_come_back_at_its_member_lost():
    pacer, grants = _pacer_with_slices()
    g = [grant[0] for grant in grants]
    pacer.handle(m.SliceOpened("pool", [g[0]]), "pool", 0.1)  # used, and its Pool told us
    # g1 used too, but the Pool died before telling; g2, g3 unused at the shard.
    pacer.handle(m.MemberLost("pool", "pool"), None, 0.2)
    assert pacer.in_flight == {}, "every lease on the dead Pool is back"
    assert _pool_counts(pacer, 0.2) == {"pool": (0, 0)}
    assert sum(b.held for b in pacer.buckets) == 0 and sum(b.outstanding for b in pacer.buckets) == 0
    # The shard's late report of g1 (used) finds nothing to count twice.
    pacer.handle(m.SliceReport("coalescer:0", [g[1]], [], False), "coalescer:0", 0.3)
    assert sum(b.held for b in pacer.buckets) == 0 and pacer.in_flight == {}


@pytest.mark.parametrize("seed", seeds(10), ids=ids)
def test_the_pacer_counts_every_call_on_the_pool_that_runs_it_while_the_slices_are_out(seed):
    # Long calls over two Pools: once they all run, the Pacer's per-Pool in_flight (the
    # admin state, the pacer_leases gauge) is each Pool's open calls, the ones shards opened
    # from their slices included, though no shard has reported them (they still hold grants).
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=100, burst=50, concurrency=50), lease_slice=8, pools=2)
    sim.upstream(ttft_ms=100, token_interval_ms=20, tokens=100)  # 2.1 s calls
    # Five and four requests on the two shards: each is cut a slice of 8 at its second ask and
    # opens the rest from it, never down to half its slice (when it would report them).
    texts = [(text, f"e{shard + 1}") for shard, n in ((0, 5), (1, 4)) for text in texts_on(shard, n, prefix="k")]
    clients = [sim.client(at=sim.rng.uniform(0, 0.3), text=text, edge=edge) for text, edge in texts]
    sim.run(until=1.0, check=False)
    assert len(sliced_calls(sim)) >= 3, "calls were opened from the slices"
    assert not sim.messages(m.SliceReport), "and no shard reported them"
    assert all(not c.outcome for c in clients), "all still running"
    counts = _pool_counts(sim.pacer, sim.now)
    assert {role: n for role, (n, _) in counts.items()} == {p.name: len(p.logic.calls) for p in sim.pools}
    assert sum(held for _, held in counts.values()) > 0, "the slices are still out, unreported"
    sim.run()
    assert {c.outcome for c in clients} == {"done"}


# --- rule 7: live settings -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", seeds(20), ids=ids)
def test_a_live_settings_change_recalls_the_slices(seed):
    sim = Simulation(seed=seed, pacer=PacerSettings(rps=50, burst=20, concurrency=20, max_wait_s=60), lease_slice=8)
    sim.upstream(ttft_ms=50, token_interval_ms=10, tokens=3)
    before = workload(sim, 20, 0.9)
    sim.configure_pacer(at=1.0, rps=2, burst=2)
    after = [sim.client(at=1.05 + sim.rng.uniform(0, 2.0), text=f"x{i}", edge=f"e{i % 2 + 1}") for i in range(12)]
    sim.run()
    assert {c.outcome for c in before + after} == {"done"}
    recalls = [d for d in sim.messages(m.SliceRecall) if d.sent_at >= 1.0]
    assert recalls and min(d.sent_at for d in recalls) < 1.01
    times = [t for t in call_times(sim) if t > 1.05]
    assert_bucket_bound(times, 2, 2)


# --- chaos with slices ---------------------------------------------------------------------------


def chaos(seed: int, kills: int) -> Simulation:
    settings = PacerSettings(rps=20, burst=10, concurrency=8, rpm=200, max_queue=30, max_wait_s=8)
    sim = Simulation(seed=seed, shards=3, pacer=settings, latency_ms=(0.3, 5.0), metrics=True, lease_slice=4, pools=2)
    rng = sim.rng
    sim.upstream(chaotic_upstream(rng))
    for _ in range(120):
        at = rng.uniform(0, 10)
        leave = at + rng.uniform(0, 2) if rng.random() < 0.3 else None
        sim.client(at=at, text=f"q{rng.randrange(30)}", edge=f"e{rng.randrange(3) + 1}", disconnect_at=leave)
    nodes = list(sim.nodes) + ["edge:e1", "edge:e2", "edge:e3"]
    for _ in range(6):
        sim.pause(rng.choice(nodes), at=rng.uniform(0, 10), for_s=rng.uniform(0.01, 2.0))
    sim.configure_pacer(at=rng.uniform(0, 10), rps=rng.choice([2, 10, 20]), concurrency=rng.choice([3, 8]))
    for _ in range(kills):
        victim = rng.choice([*sim.pool_roles, PACER, "coalescer:0", "coalescer:1", "coalescer:2"])
        sim.kill(victim, at=rng.uniform(0, 10), restart_s=rng.uniform(0.05, 1.5))
    return sim


@pytest.mark.parametrize("seed", seeds(40), ids=ids)
def test_slices_under_chaos_and_kills_keep_the_invariants(seed):
    sim = chaos(seed, kills=3)
    sim.run()
    assert sim.quiescent
    assert all(c.outcome in ("done", "error", "rejected", "disconnected", "cancelled") for c in sim.clients)
