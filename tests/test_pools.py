"""SLUICE_POOLS=2 on the real system: calls spread over both Pools, each with its own hub;
coalescing, pacing and cancelling work across them; a Pool killed with SIGKILL takes only
its own streams, gives its leases back and is replaced; Ctrl-C leaves nothing (the
`running_gateway` helper checks every process and port at the end).

Real processes: run.py with two Pool actors, the simulated provider as its own process
(its /stats shows every upstream call), real HTTP over loopback.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from actors.lease_slices import IDLE_S
from tests.support import (
    SSEClient,
    chat_body,
    data_events,
    ends_when_read,
    get_json,
    read_in_background,
    request,
    running_gateway,
    stream_chat,
    wait_until,
)

TOKEN = "pools-test-token"
ENV = {
    "SLUICE_POOLS": "2",
    "SIMULATED_CONCURRENCY": "40",
    "SIMULATED_RPS": "50",
    "SIMULATED_BURST": "50",
    "SLUICE_ADMIN_TOKEN": TOKEN,
}
AUTH = {"authorization": f"Bearer {TOKEN}"}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def gw(sim):
    with running_gateway({**ENV, "SIMULATED_BASE_URL": sim}) as gateway:
        gateway.sim = sim
        yield gateway


def admin_state(gw, role: str) -> dict:
    status, _, body = request("GET", gw.url + f"/api/admin/state?role={role}", headers=AUTH)
    assert status == 200, body
    return json.loads(body)["results"]


def pacer_pools(gw) -> dict:
    return admin_state(gw, "pacer")["pacer:simulated"]["pools"]


def calls_for(gw, text: str) -> list[dict]:
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if text in json.dumps(r["body"])]


def slice_uses(gw) -> int:
    """Calls the Coalescer shards have opened from lease slices, all told."""
    return sum(shard["slice_grants_used_total"] for shard in admin_state(gw, "coalescer").values())


def cancelled_calls(gw, text: str) -> list[dict]:
    stats = get_json(gw.sim + "/stats")[1]
    ids = {r["call_id"] for r in stats["requests"] if text in json.dumps(r["body"])}
    return [c for c in stats["cancellations"] if c["call_id"] in ids]


def open_streams(gw, texts: list[str]) -> list[SSEClient]:
    clients = [SSEClient(gw.url + "/api/chat", chat_body(t), timeout=60) for t in texts]
    assert [c.status for c in clients] == [200] * len(clients)
    return clients


def first_delta(client: SSEClient) -> None:
    while (event := client.next()) is not None:
        if event[0] == "message" and event[1]["type"] == "delta":
            return
    raise AssertionError(f"no delta: {client.events}")


def pid_of(gw, role: str) -> int:
    def pid():
        status, body = get_json(gw.url + "/readyz")
        return body.get("actors", {}).get(role, {}).get("pid") if status == 200 else None

    return wait_until(pid, timeout=20, message=f"{role} ready")


def test_streams_spread_over_both_pools_and_a_cancel_aborts_on_each(gw):
    text = f"spread {uuid.uuid4().hex}"
    clients = open_streams(gw, [f"{text} {i}\n#sim tokens=1000 token_interval_ms=20" for i in range(6)])
    try:
        for client in clients:
            first_delta(client)
        pools = admin_state(gw, "pool")
        assert set(pools) == {"pool", "pool:1"}
        # Least loaded first: 3 and 3 when the Pacer chooses each; with lease slices a grant's
        # Pool is chosen when the slice is cut, so a shard's calls can land one off (2 and 4).
        counts = [len(pools[r]["open_calls"]) for r in ("pool", "pool:1")]
        assert sum(counts) == 6 and min(counts) >= 2, pools
        # Each Pool's own hub serves its streams: the edge holds a connection to each.
        assert [pools[r]["hub"]["edge_connections"] for r in ("pool", "pool:1")] == [1, 1], pools
        # The Pacer holds a lease on each Pool for every call running there (in_flight; a
        # call a shard opened from its lease slice once the Pool has told the Pacer, at most
        # OPENED_FLUSH_S later), and for the grants shards hold for it unused (held;
        # SLUICE_LEASE_SLICE, docs/architecture.md "Lease slices").
        leases = {r: p["in_flight"] + p["held"] for r, p in pacer_pools(gw).items()}
        assert leases["pool"] >= 3 and leases["pool:1"] >= 3, pacer_pools(gw)
    finally:
        for client in clients:
            client.close()
    # Every client left: each Pool aborts its calls, and the provider sees every cancel.
    wait_until(lambda: len(cancelled_calls(gw, text)) == 6, timeout=10, message="six upstream cancels")
    wait_until(
        lambda: all(not p["open_calls"] for p in admin_state(gw, "pool").values()),
        timeout=10,
        message="no call open on either Pool",
    )


def test_twenty_identical_requests_make_one_upstream_call(gw):
    text = f"identical {uuid.uuid4().hex}"
    # ~1 s in flight: on a loaded machine the last of the 20 threads still finds the flight
    # running (one that came after its end would rightly start a second call).
    body = chat_body(text + "\n#sim ttft_ms=300 tokens=8 token_interval_ms=100")
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda _: stream_chat(gw.url + "/api/chat", body), range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    texts = {"".join(d.get("delta", "") for d in data_events(events)) for _, _, events in results}
    assert len(texts) == 1 and all(data_events(events)[-1]["type"] == "done" for _, _, events in results)
    roles = sorted(data_events(events)[0]["role"] for _, _, events in results)
    calls = [
        {k: c[k] for k in ("call_id", "started_at", "first_byte_at", "outcome", "conn_id")} for c in calls_for(gw, text)
    ]
    assert roles == ["follower"] * 19 + ["leader"], calls  # one flight
    assert len(calls) == 1, calls  # and one call for it (two: an attempt retried before its first byte?)


def test_rps_one_across_two_pools_is_at_most_one_call_a_second(gw):
    status, _, body = request("POST", gw.url + "/api/admin/pacer/simulated", body={"rps": 1, "burst": 1}, headers=AUTH)
    assert status == 200, body
    text = f"paced {uuid.uuid4().hex}"
    try:
        clients = open_streams(gw, [f"{text} {i}\n#sim ttft_ms=20 tokens=120 token_interval_ms=20" for i in range(4)])
        # 2.4 s calls granted a second apart: both Pools hold one at some point.
        wait_until(
            lambda: all(p["in_flight"] for p in pacer_pools(gw).values()), timeout=10, message="a call on each Pool"
        )
        ends = [data_events(c.read_all())[-1]["type"] for c in clients]
        for client in clients:
            client.close()
    finally:
        request("POST", gw.url + "/api/admin/pacer/simulated", body={"rps": 50, "burst": 50}, headers=AUTH)
    assert ends == ["done"] * 4
    started = sorted(call["started_at"] for call in calls_for(gw, text))
    gaps = [round(b - a, 3) for a, b in zip(started, started[1:])]
    print(f"upstream calls started {gaps} s apart")
    assert len(started) == 4 and min(gaps) >= 0.9, gaps  # granted 1 s apart; the hop to a Pool jitters


def test_a_killed_pool_ends_only_its_own_streams_and_gives_its_leases_back(gw):
    text = f"kill {uuid.uuid4().hex}"
    uses_before = slice_uses(gw)
    clients = open_streams(gw, [f"{text} {i}\n#sim ttft_ms=20 tokens=200 token_interval_ms=20" for i in range(6)])
    opened_at = time.monotonic()
    for client in clients:
        first_delta(client)
    sliced = slice_uses(gw) > uses_before  # some of the six were opened from a lease slice
    # The Pacer counts every call on the Pool that runs it: those a shard opened from its
    # lease slice too, once their Pool has told it (at most OPENED_FLUSH_S after the open:
    # actors/pool_logic.py, docs/architecture.md "Lease slices"). A slice grant's Pool is
    # chosen when the slice is cut, so the six calls can land 4 and 2 rather than 3 and 3.
    running = {r: len(p["open_calls"]) for r, p in admin_state(gw, "pool").items()}
    assert sum(running.values()) == 6 and min(running.values()) >= 2, running

    last: dict = {}

    def counted() -> dict | None:
        last["pools"] = pools = pacer_pools(gw)
        in_flight = {r: p["in_flight"] for r, p in pools.items()}
        return {"held": sum(p["held"] for p in pools.values())} if in_flight == running else None

    try:
        seen = wait_until(counted, timeout=10, message=f"the Pacer counting {running} calls")
    except AssertionError as failed:
        raise AssertionError(f"{failed}; the Pacer's Pools: {last.get('pools')}") from None
    # ... while the shards still hold the rest of their slices: the count does not wait for a
    # shard's report (at half its slice, or when it gives an idle slice back IDLE_S after its
    # last use, which a loaded machine can reach before the Pool's word: then it proves nothing).
    assert not sliced or seen["held"] > 0 or time.monotonic() - opened_at >= IDLE_S, (seen, last["pools"])
    ends, threads = read_in_background(clients)
    victim = pid_of(gw, "pool")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # Its leases come back, those of the calls it ran and the slice grants shards held for it.
    def dead_pool_leases() -> int:
        pool = pacer_pools(gw)["pool"]
        return pool["in_flight"] + pool["held"]

    wait_until(lambda: dead_pool_leases() == 0, timeout=10, message="the dead Pool's leases back")
    print(
        f"leases of the killed Pool back {time.monotonic() - killed_at:.2f} s after the kill (calls {running}, sliced: {sliced})"
    )
    assert pacer_pools(gw)["pool:1"]["in_flight"] == running["pool:1"], "the other Pool's calls go on"
    kinds = ends_when_read(ends, threads, clients, 30)
    assert kinds == ["done:"] * running["pool:1"] + ["error:hub_disconnected"] * running["pool"], kinds
    wait_until(lambda: pid_of(gw, "pool") != victim, timeout=20, message="a new Pool")
    wait_until(lambda: request("GET", gw.url + "/readyz")[0] == 200, timeout=20, message="ready again")
    wait_until(lambda: sum(p["in_flight"] for p in pacer_pools(gw).values()) == 0, timeout=10, message="idle")
    # New requests are served, on both Pools (the replacement included).
    after = f"after {uuid.uuid4().hex}"
    results = [stream_chat(gw.url + "/api/chat", chat_body(f"{after} {i}\n#sim tokens=3")) for i in range(2)]
    assert [data_events(events)[-1]["type"] for _, _, events in results] == ["done", "done"]


def test_every_pool_has_its_active_streams_series_before_its_first_call(sim):
    # A fresh gateway, no request yet: each Pool reports its gauge (0) once it is up, so an
    # operator's dashboard and alerts see every Pool from the start.
    with running_gateway({**ENV, "SIMULATED_BASE_URL": sim}) as fresh:

        def series():
            status, _, body = request("GET", fresh.url + "/metrics")
            text = body.decode() if status == 200 else ""
            return all(f'sluice_active_streams{{pool="{pool}"}} 0' in text for pool in ("pool", "pool:1"))

        wait_until(series, timeout=20, message="both Pools' active_streams series, at 0")
