"""Several hosts, one gateway (docs/scale-out.md): a Thespian Convention of real run.py
processes, each its own host on its own loopback address (127.0.0.2, .3, .4; Linux routes
all of 127.0.0.0/8 to lo), its edge and actor system bound there. The leader (no
SLUICE_JOIN) runs the Pacer and Metrics; each member (SLUICE_JOIN=leader) runs its own
edge and Pool and takes a share of the Coalescer shards. One simulated provider, its own process,
counts the upstream calls (/stats).

- identical requests spread over the three hosts make one upstream call, and every
  client gets the same stream;
- distinct requests spread over the hosts are paced by one budget (RPS=1, BURST=1);
- a host without the cluster secret cannot join (it exits 2; the leader never lists it);
- a member killed with SIGKILL is noticed (the time is printed: docs/scale-out.md), the
  streams on its Pool end with an error event, the others complete, new requests work;
- a member that joins takes a shard (a flight it held on the leader completes), identical
  requests at both hosts for a key of that shard make one call, and when the member is
  killed the shard is recreated on the leader: its flight's client gets an error event,
  the leases return, the key is served again;
- six shards over three hosts joining in turn end 2 + 2 + 2, one moved from the first
  member to the last (actors/placement.py `spread`);
- a member killed and restarted at once at its address (before the leader noticed) gets
  new Pools and its shard back, the old incarnation's leases return, nothing stale stays;
- a member's run.py SIGKILLed alone: its admin's watch stops its actor system (no
  watchdog process ran there);
- Ctrl-C of every host leaves no process and no port (checked after each cluster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from tests.support import (
    ROOT,
    Gateway,
    SSEClient,
    alive,
    chat_body,
    cmdline,
    data_events,
    descendants,
    ends_when_read,
    get_json,
    read_in_background,
    request,
    stream_chat,
    wait_until,
)

SECRET = "scale-out-test-secret-0123456789abcdef"
TOKEN = "scale-out-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def cluster_env(sim: str, **extra: str) -> dict[str, str]:
    return {
        "SLUICE_CLUSTER_SECRET": SECRET,
        "SLUICE_ADMIN_TOKEN": TOKEN,
        "SIMULATED_BASE_URL": sim,
        "SLUICE_POOLS": "1",
        **extra,
    }


@contextmanager
def running_cluster(sim: str, hosts=HOSTS, per_host: dict | None = None, **extra: str):
    """A leader on hosts[0], a member joined to it on each other host (`per_host`: more
    settings for some hosts); on exit every host gets Ctrl-C and nothing of any may be left."""
    per_host = per_host or {}
    env = cluster_env(sim, **extra)
    started: list[Gateway] = []
    try:
        leader = Gateway({**env, **per_host.get(hosts[0], {})}, hosts[0]).start()
        started.append(leader)
        for host in hosts[1:]:
            join = {"SLUICE_JOIN": f"{hosts[0]}:{leader.actor_port}"}
            started.append(Gateway({**env, **join, **per_host.get(host, {})}, host).start(60))
        for gw in started:
            gw.sim = sim
        wait_until(lambda: len(members(leader)) == len(hosts) - 1, timeout=30, message="every member listed")
        yield started
    finally:
        stop_hosts(started)


def stop_hosts(started: list[Gateway]) -> None:
    """Ctrl-C for every host, members first (the leader sees them leave); nothing of any
    may be left."""
    for gw in reversed(started):
        gw.stop()
    try:
        wait_until(
            lambda: all(gw.leftovers() == (set(), set()) for gw in started),
            timeout=20,
            message="no process or port left on any host",
        )
    finally:
        for gw in started:
            gw.kill_leftovers()


def signal_tree(gw: Gateway, sig: int) -> None:
    """`sig` to run.py and everything it started (its actor system, watchdog, workers), and to
    their process groups but this one's: an actor forked after the tree was read (a
    Supervisor recreating a shard as the host dies) is in its actor system's group, and
    was left running once its parent had died (seen twice)."""
    victims = descendants(gw.proc.pid) | {gw.proc.pid}
    gw.tree |= victims
    groups = set()
    for pid in victims:
        try:
            groups.add(os.getpgid(pid))
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def admin_state(gw: Gateway, role: str) -> dict:
    status, _, body = request("GET", gw.url + f"/api/admin/state?role={role}", headers=AUTH)
    assert status == 200, body
    return json.loads(body)["results"]


def members(leader: Gateway) -> dict:
    return admin_state(leader, "supervisor")["supervisor"]["members"]


def calls_for(sim: str, text: str) -> list[dict]:
    return [r for r in get_json(sim + "/stats")[1]["requests"] if text in json.dumps(r["body"])]


def text_of(events) -> str:
    return "".join(e.get("delta", "") for e in data_events(events) if e.get("type") == "delta")


@pytest.fixture(scope="module")
def cluster(sim):
    # One budget for the account, exact across the hosts: 1 call/s, no burst. The last
    # member runs two edge workers: each finds the leader's Supervisor by its global name.
    # Six shards: the first member takes three of the leader's, the second one of the
    # leader's and one of the first member's (a move between members).
    with running_cluster(
        sim,
        per_host={HOSTS[2]: {"SLUICE_WORKERS": "2"}},
        SIMULATED_RPS="1",
        SIMULATED_BURST="1",
        SIMULATED_CONCURRENCY="20",
        COALESCER_SHARDS="6",
    ) as hosts:
        # Every move done, every old actor stopped: an identical request then finds one
        # actor per shard from any host.
        wait_until(
            lambda: admin_state(hosts[0], "supervisor")["supervisor"]["retiring"] == [],
            timeout=60,
            message="the moved shards' old actors stopped",
        )
        yield hosts


def test_the_shards_are_spread_evenly_a_member_giving_one_to_the_last(cluster):
    leader, first, last = cluster
    expected = {
        leader: ["coalescer:0", "coalescer:1"],
        first: ["coalescer:3", "coalescer:4"],
        last: ["coalescer:2", "coalescer:5"],  # coalescer:5 came from the first member
    }
    listed = members(leader)
    assert {host: info["shards"] for host, info in listed.items()} == {
        f"{gw.host}:{gw.actor_port}": shards for gw, shards in expected.items() if gw is not leader
    }
    # Each shard's actor runs on the host it is listed on.
    for gw, shards in expected.items():
        for role in shards:
            assert actor_pid(leader, role) in descendants(gw.proc.pid), (role, gw.host)


def test_every_member_runs_its_own_pool_on_its_own_host(cluster):
    leader = cluster[0]
    listed = members(leader)
    assert sorted(listed) == sorted(f"{gw.host}:{gw.actor_port}" for gw in cluster[1:])
    pools = sorted(p for info in listed.values() for p in info["pools"])
    assert pools == ["pool:1", "pool:2"]
    # Each member's edge is ready and sees the whole cluster's actors (one Pacer, the leader's).
    for gw in cluster:
        status, body = get_json(gw.url + "/readyz")
        assert status == 200 and {"pool", "pool:1", "pool:2", "pacer:simulated"} <= set(body["actors"]), body
    pacer_pools = admin_state(leader, "pacer")["pacer:simulated"]["pools"]
    assert sorted(pacer_pools) == ["pool", "pool:1", "pool:2"]


def test_identical_requests_on_three_hosts_make_one_upstream_call(cluster):
    text = f"together {uuid.uuid4().hex}"
    body = chat_body(f"{text}\n#sim ttft_ms=3000 tokens=8")  # slow enough for all to join the one call

    def one(i: int):
        gw = cluster[i % len(cluster)]
        client = SSEClient(gw.url + "/api/chat", body, timeout=60)
        try:
            assert client.status == 200
            return gw.host, client.read_all()
        finally:
            client.close()

    with ThreadPoolExecutor(60) as pool:
        results = list(pool.map(one, range(60)))
    assert {host for host, _ in results} == set(HOSTS)
    texts = {text_of(events) for _, events in results}
    assert len(texts) == 1 and texts != {""}, "every client, on every host, got the same stream"
    assert all(data_events(events)[-1]["type"] == "done" for _, events in results)
    assert len(calls_for(cluster[0].sim, text)) == 1, "one upstream call for the whole cluster"


def test_pacing_is_one_budget_across_hosts(cluster):
    # Each Pool opens its HTTP/2 connection to the provider on its first call: a call at
    # each host first (it runs on that host's Pool) so that no connection setup shortens a
    # gap measured at the provider.
    warm = f"warm {uuid.uuid4().hex}"
    for i, gw in enumerate(cluster):
        status, _, _ = request("POST", gw.url + "/api/chat", chat_body(f"{warm} {i}\n#sim tokens=1"))
        assert status == 200
    text = f"paced {uuid.uuid4().hex}"
    bodies = [(cluster[i % len(cluster)], chat_body(f"{text} {i}\n#sim ttft_ms=10 tokens=2")) for i in range(6)]

    def one(item):
        gw, body = item
        client = SSEClient(gw.url + "/api/chat", body, timeout=60)
        try:
            return client.status, client.read_all()
        finally:
            client.close()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, bodies))
    assert [status for status, _ in results] == [200] * 6
    assert all(data_events(events)[-1]["type"] == "done" for _, events in results)
    started = sorted(r["started_at"] for r in calls_for(cluster[0].sim, text))
    gaps = [round(b - a, 3) for a, b in zip(started, started[1:])]
    print(f"upstream calls from three hosts started {gaps} s apart")
    # The Pacer grants 1 s apart; what the provider sees adds each grant's hop to its Pool,
    # which a loaded machine once stretched by 0.29 s (a gap of 0.71 s, the next one 1.29).
    # A jitter moves a start, not the span: six calls take >= 5 s less one hop's jitter,
    # and no two come together (three hosts pacing apart would start three at once).
    assert len(started) == 6, started
    assert started[-1] - started[0] >= 4.7 and min(gaps) >= 0.5, gaps


def test_a_request_runs_on_a_pool_of_the_host_it_arrived_at(cluster):
    # Pool locality (docs/scale-out.md): the Pacer gives a flight a Pool of the host where
    # its first client arrived. Three requests at one member, two at the leader and one at
    # the other member (two edge workers): the least loaded Pool alone would spread them
    # 2/2/2 over the three Pools.
    leader = cluster[0]
    pool_of = {host: info["pools"][0] for host, info in members(leader).items()}
    at = [cluster[1]] * 3 + [leader] * 2 + [cluster[2]]
    text = f"local {uuid.uuid4().hex}"
    clients = []
    try:
        for i, gw in enumerate(at):
            body = chat_body(f"{text} {i}\n#sim ttft_ms=8000 tokens=1")
            clients.append(SSEClient(gw.url + "/api/chat", body, timeout=60))
        assert [c.status for c in clients] == [200] * len(at)

        def placed():
            pools = admin_state(leader, "pacer")["pacer:simulated"]["pools"]
            counts = {role: p["in_flight"] + p["queued"] for role, p in pools.items()}
            return pools if sum(counts.values()) == len(at) else None

        pools = wait_until(placed, timeout=30, interval=0.1, message="every request given its Pool")
        member_1, member_2 = (pool_of[f"{gw.host}:{gw.actor_port}"] for gw in cluster[1:])
        counts = {role: p["in_flight"] + p["queued"] for role, p in pools.items()}
        assert counts == {"pool": 2, member_1: 3, member_2: 1}, pools
        assert pools["pool"]["host"] == f"{leader.host}:{leader.actor_port}"
        assert pools[member_1]["host"] == f"{cluster[1].host}:{cluster[1].actor_port}"
    finally:
        for client in clients:
            client.close()


def test_a_host_without_the_cluster_secret_cannot_join(cluster):
    leader = cluster[0]
    before = members(leader)
    stranger = Gateway(
        {
            **cluster_env(leader.sim),
            "SLUICE_CLUSTER_SECRET": "not-the-cluster-secret-0123456789abcdef",
            "SLUICE_JOIN": f"{leader.host}:{leader.actor_port}",
        },
        "127.0.0.9",
    )
    try:
        with pytest.raises(AssertionError, match="exited with 2") as refused:
            stranger.start(90)
        assert "could not join the cluster" in str(refused.value)
        # Its frames were refused unread (patches/thespian_transport.py): the leader never
        # listed it, and the cluster serves on.
        assert members(leader) == before
        status, _, _ = request("POST", leader.url + "/api/chat", chat_body(f"still {uuid.uuid4().hex}"))
        assert status == 200
    finally:
        stranger.stop()
        wait_until(lambda: stranger.leftovers() == (set(), set()), timeout=15, message="nothing of the stranger left")
        stranger.kill_leftovers()


def test_a_killed_member_is_noticed_its_streams_end_and_the_rest_goes_on(sim):
    # One shard: it stays on the leader (a member takes 1 // 2 = 0), so only the lost Pool
    # ends streams here; a lost member's shards: test_a_member_takes_coalescer_shards_...
    # Lease slices off: the assertions read the Pacer's per-Pool count of granted calls,
    # which a call opened from a shard's slice joins only once reported (the simulator
    # covers slices with Pool kills: tests/test_lease_slices.py).
    with running_cluster(
        sim,
        hosts=("127.0.0.5", "127.0.0.6"),
        SIMULATED_RPS="50",
        SIMULATED_BURST="50",
        COALESCER_SHARDS="1",
        SLUICE_LEASE_SLICE="0",
    ) as hosts:
        leader, member = hosts
        text = f"kill {uuid.uuid4().hex}"
        # Four streams at the leader's edge: two of its own (on its Pool), and two that
        # follow a call started at the member's edge (on the member's Pool, where the
        # flight's first client arrived: docs/scale-out.md, "Pool locality").
        bodies = [chat_body(f"{text} {i}\n#sim tokens=200 token_interval_ms=20") for i in range(4)]
        firsts = [SSEClient(member.url + "/api/chat", body, timeout=60) for body in bodies[:2]]
        for client in firsts:
            while (event := client.next()) is not None and not (event[0] == "message" and event[1]["type"] == "delta"):
                pass
        clients = [SSEClient(leader.url + "/api/chat", body, timeout=60) for body in bodies]
        assert [c.status for c in [*firsts, *clients]] == [200] * 6
        for client in clients:
            while (event := client.next()) is not None and not (event[0] == "message" and event[1]["type"] == "delta"):
                pass
        pools = admin_state(leader, "pacer")["pacer:simulated"]["pools"]
        assert {r: p["in_flight"] for r, p in pools.items()} == {"pool": 2, "pool:1": 2}, pools
        ends, threads = read_in_background(clients)
        signal_tree(member, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: members(leader) == {}, timeout=60, message="the leader notices the lost member")
        print(f"member loss noticed {time.monotonic() - killed_at:.2f} s after SIGKILL")
        # the member's own clients (firsts) lost their edge with it
        kinds = ends_when_read(ends, threads, [*firsts, *clients], 30)
        assert kinds == ["done:"] * 2 + ["error:hub_disconnected"] * 2, kinds
        wait_until(
            lambda: sum(p["in_flight"] for p in admin_state(leader, "pacer")["pacer:simulated"]["pools"].values()) == 0,
            timeout=20,
            message="the lost host's leases back in the budget",
        )
        # New requests on the surviving host are served (on its own Pool).
        after = f"after {uuid.uuid4().hex}"
        for i in range(2):
            status, _, body = request("POST", leader.url + "/api/chat", chat_body(f"{after} {i}\n#sim tokens=3"))
            assert status == 200, body
        member.proc.wait(10)


def test_a_member_whose_run_py_alone_is_killed_leaves_nothing_by_its_admins_watch(sim):
    """A member runs its own admin, which watches its run.py (patches/thespian_admin_watch.py):
    no watchdog process on the member; its run.py SIGKILLed alone, the admin stops the
    member's actor system (nothing of its tree, no port left) and the leader sees it go."""
    with running_cluster(sim, hosts=("127.0.0.7", "127.0.0.8"), COALESCER_SHARDS="1") as hosts:
        leader, member = hosts
        tree = descendants(member.proc.pid)
        assert not [pid for pid in tree if "actors.watchdog" in cmdline(pid)], "a watchdog process on the member"
        member.tree |= tree
        member.proc.send_signal(signal.SIGKILL)
        member.proc.wait(10)
        wait_until(lambda: member.leftovers() == (set(), set()), timeout=30, message="the member's system stopped")
        wait_until(lambda: members(leader) == {}, timeout=60, message="the leader notices the lost member")


def test_metrics_and_admin_answer_for_the_whole_cluster_from_any_host(cluster):
    text = f"counted {uuid.uuid4().hex}"
    body = chat_body(f"{text}\n#sim ttft_ms=1500 tokens=4")

    def one(i: int):
        client = SSEClient(cluster[i % len(cluster)].url + "/api/chat", body, timeout=60)
        try:
            return client.read_all()
        finally:
            client.close()

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(one, range(9)))
    assert all(data_events(events)[-1]["type"] == "done" for events in results)
    assert len(calls_for(cluster[0].sim, text)) == 1

    # One Metrics actor (the leader's) holds every host's records: each host answers the same.
    def coalesce_everywhere():
        seen = []
        for gw in cluster:
            status, report = get_json(gw.url + "/api/metrics/performance?last_n=9")
            assert status == 200, report
            seen.append((report["coalesce"]["leaders"], report["coalesce"]["followers"]))
        return seen if seen == [(1, 8)] * len(cluster) else None

    wait_until(coalesce_everywhere, timeout=20, message="every host reports the cluster's 1 leader, 8 followers")
    # /metrics on a member renders every host's Pools; `run.py admin show` there shows the cluster.
    member = cluster[-1]
    status, _, metrics = request("GET", member.url + "/metrics")
    assert status == 200
    for pool in ("pool", "pool:1", "pool:2"):
        assert f'sluice_active_streams{{pool="{pool}"}}' in metrics.decode(), pool
    shown = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "admin", "show"],
        cwd=ROOT,
        env=member.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert sorted(json.loads(shown.stdout)["results"]["supervisor"]["members"]) == sorted(members(cluster[0]))

    # An admin command sent to a member reaches the one Pacer (on the leader), and back.
    status, _, reply = request("POST", member.url + "/api/admin/pacer/simulated", {"rps": 2}, headers=AUTH)
    assert status == 200, reply
    try:
        assert admin_state(cluster[0], "pacer")["pacer:simulated"]["settings"]["rps"] == 2
    finally:
        status, _, reply = request("POST", member.url + "/api/admin/pacer/simulated", {"rps": 1}, headers=AUTH)
        assert status == 200, reply
    assert admin_state(cluster[1], "pacer")["pacer:simulated"]["settings"]["rps"] == 1


def same_address(gw: Gateway) -> Gateway:
    """A new run.py for the host `gw` was: same address, same ports, same settings."""
    again = Gateway({k: v for k, v in gw.env.items() if k not in ("SLUICE_PORT", "SLUICE_ACTOR_PORT")}, gw.host)
    again.port, again.actor_port, again.url = gw.port, gw.actor_port, gw.url
    again.env.update(SLUICE_PORT=str(gw.port), SLUICE_ACTOR_PORT=str(gw.actor_port))
    return again


def test_a_lost_leader_stops_admission_and_its_restart_takes_the_members_back(sim):
    with running_cluster(sim, hosts=("127.0.0.7", "127.0.0.8"), SIMULATED_RPS="50", SIMULATED_BURST="50") as hosts:
        leader, member = hosts
        status, _, _ = request("POST", member.url + "/api/chat", chat_body(f"before {uuid.uuid4().hex}"))
        assert status == 200
        status, ready = get_json(member.url + "/readyz")
        orphan = ready["actors"]["pool:1"]["pid"]  # the member's Pool, placed by the leader's Supervisor
        assert orphan in descendants(member.proc.pid)
        signal_tree(leader, signal.SIGKILL)
        killed_at = time.monotonic()
        leader.proc.wait(10)
        # The member's edge stops admitting: /readyz says so (the load balancer's cue) and a
        # request gets an error answer, not a hang.
        wait_until(lambda: request("GET", member.url + "/readyz", timeout=5)[0] == 503, timeout=30, message="503")
        print(f"member /readyz 503 {time.monotonic() - killed_at:.2f} s after the leader's SIGKILL")
        asked = time.monotonic()
        status, _, body = request("POST", member.url + "/api/chat", chat_body(f"during {uuid.uuid4().hex}"), timeout=60)
        print(f"a request at the member during the leader's absence: {status} after {time.monotonic() - asked:.2f} s")
        assert status >= 500 and "error" in json.loads(body), body
        assert member.proc.poll() is None, "the member host keeps running"
        # Its Pool lost its Supervisor with the leader: the member's keeper stops it.
        wait_until(lambda: not alive(orphan), timeout=30, message="the orphaned Pool stopped")

        # The leader comes back at the same address: the member registers again, the new
        # Supervisor places a Pool on it, and the member serves again.
        again = same_address(leader).start(60)
        hosts.append(again)
        again.sim = sim
        restarted = time.monotonic()
        wait_until(lambda: len(members(again)) == 1, timeout=30, message="the member listed by the new leader")
        wait_until(lambda: request("GET", member.url + "/readyz", timeout=5)[0] == 200, timeout=60, message="ready")
        print(f"member serving again {time.monotonic() - restarted:.2f} s after the leader's restart")
        status, _, events = stream_chat(member.url + "/api/chat", chat_body(f"after {uuid.uuid4().hex}\n#sim tokens=3"))
        assert status == 200 and data_events(events)[-1]["type"] == "done"


def test_a_member_with_another_shard_count_is_refused(cluster):
    # Its edges would hash identical requests to other shards than the leader's edges do.
    leader = cluster[0]
    shards = len([r for r in get_json(leader.url + "/readyz")[1]["actors"] if r.startswith("coalescer:")])
    odd = Gateway(
        {
            **cluster_env(leader.sim),
            "COALESCER_SHARDS": str(shards + 1),
            "SLUICE_JOIN": f"{leader.host}:{leader.actor_port}",
        },
        "127.0.0.12",
    )
    try:
        with pytest.raises(AssertionError, match="exited with 2") as refused:
            odd.start(90)
        assert f"COALESCER_SHARDS={shards + 1} here and {shards} on the leader" in str(refused.value)
    finally:
        odd.stop()
        wait_until(lambda: odd.leftovers() == (set(), set()), timeout=15, message="nothing of it left")
        odd.kill_leftovers()
    # It left the Convention on its way out.
    wait_until(lambda: len(members(leader)) == len(cluster) - 1, timeout=30, message="only the cluster's members")


def test_a_member_without_a_shard_count_takes_the_leaders(sim):
    # The leader runs 3 shards; a member's own default is 2 (a host of a cluster). Left
    # unset, it counts the leader's 3 (else it would be refused, as above): a key goes to
    # the same shard from either host, so identical requests at both make one upstream call.
    with running_cluster(sim, hosts=("127.0.0.17",), COALESCER_SHARDS="3", SIMULATED_RPS="50") as hosts:
        leader = hosts[0]
        join = {"SLUICE_JOIN": f"{leader.host}:{leader.actor_port}", "COALESCER_SHARDS": None}
        member = Gateway({**cluster_env(sim, SIMULATED_RPS="50"), **join}, "127.0.0.18")
        hosts.append(member)
        member.start(90)
        # Settled: the member holds its share and the moved shards' old actors have stopped
        # (an identical request meeting a shard mid-move may start a second call: scale-out.md).
        here = f"{member.host}:{member.actor_port}"
        wait_until(lambda: members(leader).get(here, {}).get("shards"), timeout=30, message="the member's shards")
        wait_until(
            lambda: admin_state(leader, "supervisor")["supervisor"]["retiring"] == [],
            timeout=60,
            message="the moved shards' old actors stopped",
        )
        texts = [f"unset {i} {uuid.uuid4().hex}" for i in range(3)]  # a 2-shard hash would miss ~2 of 3

        def one(job: tuple[Gateway, str]):
            gw, text = job
            client = SSEClient(gw.url + "/api/chat", chat_body(f"{text}\n#sim ttft_ms=3000 tokens=4"), timeout=60)
            try:
                assert client.status == 200
                return data_events(client.read_all())[-1]["type"]
            finally:
                client.close()

        with ThreadPoolExecutor(6) as pool:
            ends = list(pool.map(one, [(gw, text) for text in texts for gw in (leader, member)]))
        assert ends == ["done"] * 6
        assert [len(calls_for(sim, text)) for text in texts] == [1, 1, 1], "one call a key, from both hosts"


def actor_pid(gw: Gateway, role: str) -> int | None:
    status, ready = get_json(gw.url + "/readyz")
    return (ready.get("actors", {}).get(role) or {}).get("pid") if status == 200 else None


def flights_at(gw: Gateway) -> dict[str, int]:
    """How many flights each Coalescer shard (wherever it runs) holds now."""
    return {role: len(state.get("in_flight") or []) for role, state in admin_state(gw, "coalescer").items()}


def stream_on_shard(gw: Gateway, shard: str, body_of) -> tuple[SSEClient, dict]:
    """A client streaming `body_of(tag)` from `gw`, for a tag whose key the shard `shard`
    holds (the key hash decides: try tags until one lands there)."""
    before = flights_at(gw)

    def grown():
        now = flights_at(gw)
        return [role for role, n in now.items() if n > before.get(role, 0)] or None

    for _ in range(30):
        body = body_of(uuid.uuid4().hex)
        client = SSEClient(gw.url + "/api/chat", body, timeout=90)
        assert client.status == 200
        if wait_until(grown, timeout=30, interval=0.1, message="the request's flight at a shard") == [shard]:
            return client, body
        client.close()
        wait_until(lambda: flights_at(gw) == before, timeout=30, interval=0.1, message="the cancelled flight forgotten")
    raise AssertionError(f"no key landed on {shard}")


def finish(clients: list[SSEClient]) -> list[list]:
    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(lambda c: c.read_all(), clients))


def test_a_member_takes_coalescer_shards_and_its_loss_brings_them_back(sim):
    # Two shards (the tests' Gateway sets them): a member that joins takes coalescer:1 from the leader.
    with running_cluster(sim, hosts=("127.0.0.13",), SIMULATED_RPS="50", SIMULATED_BURST="50") as hosts:
        leader = hosts[0]
        old_shard = actor_pid(leader, "coalescer:1")
        assert old_shard in descendants(leader.proc.pid)
        # Two calls in flight at coalescer:1 while the member joins: one runs to its end, the
        # other's client leaves after the move (its Cancel reaches the new actor, by role).
        moving, _ = stream_on_shard(
            leader, "coalescer:1", lambda tag: chat_body(f"moving {tag}\n#sim tokens=100 token_interval_ms=100")
        )
        leaving, left = stream_on_shard(
            leader, "coalescer:1", lambda tag: chat_body(f"leaving {tag}\n#sim tokens=400 token_interval_ms=50")
        )
        join = {"SLUICE_JOIN": f"{leader.host}:{leader.actor_port}"}
        member = Gateway({**cluster_env(sim, SIMULATED_RPS="50", SIMULATED_BURST="50"), **join}, "127.0.0.14")
        hosts.append(member)
        joined_at = time.monotonic()
        member.start(60)
        member.sim = sim
        here = f"{member.host}:{member.actor_port}"
        wait_until(
            lambda: members(leader) == {here: {"pools": ["pool:1"], "shards": ["coalescer:1"]}},
            timeout=30,
            message="the member listed with its Pool and its shard",
        )
        # The directory names coalescer:1's new actor, on the member's host; coalescer:0 stays.
        wait_until(
            lambda: actor_pid(leader, "coalescer:1") in descendants(member.proc.pid),
            timeout=30,
            message="coalescer:1 runs on the member",
        )
        print(f"coalescer:1 moved to the member {time.monotonic() - joined_at:.2f} s after its start")
        assert actor_pid(member, "coalescer:0") in descendants(leader.proc.pid)
        # The new actor passes the Cancel on to the old one, which admitted that stream: the
        # upstream call is aborted, not run to its end.
        leaving.close()
        left_call = wait_until(
            lambda: [c for c in calls_for(sim, left["messages"][-1]["content"].split("\n")[0]) if c["outcome"]],
            timeout=60,
            message="the left call's end at the provider",
        )
        assert [c["outcome"] for c in left_call] == ["cancelled"]
        # The old actor finished the flight it held, then stopped.
        [events] = finish([moving])
        assert data_events(events)[-1]["type"] == "done" and len(text_of(events)) > 0
        wait_until(lambda: not alive(old_shard), timeout=30, message="the moved shard's old actor stopped")

        # Identical requests at both hosts, their key on the member's shard: one upstream call.
        first, body = stream_on_shard(
            member, "coalescer:1", lambda tag: chat_body(f"shared {tag}\n#sim ttft_ms=3000 tokens=6")
        )
        others = [SSEClient((leader, member)[i % 2].url + "/api/chat", body, timeout=60) for i in range(8)]
        results = finish([first, *others])
        assert all(data_events(events)[-1]["type"] == "done" for events in results)
        assert len({text_of(events) for events in results}) == 1
        assert len(calls_for(sim, body["messages"][-1]["content"].split("\n")[0])) == 1

        # The Supervisor dies (run.py's keeper replaces it): the new one adopts coalescer:1
        # where it runs, as the member's (it does not move it again).
        shard_pid = actor_pid(leader, "coalescer:1")
        supervisor = admin_state(leader, "supervisor")["supervisor"]["pid"]
        os.kill(supervisor, signal.SIGKILL)

        def replaced() -> bool:
            try:  # the admin route answers 503 (or slowly) while there is no Supervisor
                status, _, body = request("GET", leader.url + "/api/admin/state?role=supervisor", headers=AUTH)
                state = json.loads(body)["results"]["supervisor"] if status == 200 else {}
            except Exception:
                return False
            return state.get("pid") not in (None, supervisor) and here in state.get("members", {})

        wait_until(replaced, timeout=60, interval=0.2, message="a new Supervisor, the member listed again")
        assert members(leader)[here]["shards"] == ["coalescer:1"]
        assert actor_pid(leader, "coalescer:1") == shard_pid, "the member's shard was adopted, not moved"

        # A call at coalescer:1 when the member dies: its client gets an error event.
        lost, _ = stream_on_shard(
            leader, "coalescer:1", lambda tag: chat_body(f"lost {tag}\n#sim tokens=200 token_interval_ms=50")
        )
        while (event := lost.next()) is not None and not (event[0] == "message" and event[1]["type"] == "delta"):
            pass
        pools = admin_state(leader, "pacer")["pacer:simulated"]["pools"]
        on = next(role for role, p in pools.items() if p["in_flight"])
        signal_tree(member, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(
            lambda: actor_pid(leader, "coalescer:1") in descendants(leader.proc.pid),
            timeout=60,
            message="coalescer:1 re-homed on the leader",
        )
        print(f"coalescer:1 re-homed on the leader {time.monotonic() - killed_at:.2f} s after the member's SIGKILL")
        assert members(leader) == {}
        [events] = finish([lost])
        errors = [e for e in data_events(events) if e["type"] == "error"]
        # Its call ran on the leader's Pool: the Pacer failed it (the shard that asked is
        # gone); on the member's Pool: the hub went with the member.
        assert [e["code"] for e in errors] == ["coalescer_lost" if on == "pool" else "hub_disconnected"], (on, errors)
        wait_until(
            lambda: sum(p["in_flight"] for p in admin_state(leader, "pacer")["pacer:simulated"]["pools"].values()) == 0,
            timeout=20,
            message="the leases of the lost shard's flights back in the budget",
        )
        # A new request whose key coalescer:1 holds is served (by its new actor, here).
        again, _ = stream_on_shard(leader, "coalescer:1", lambda tag: chat_body(f"again {tag}\n#sim tokens=3"))
        [events] = finish([again])
        assert data_events(events)[-1]["type"] == "done"
        member.proc.wait(10)


def test_client_key_limits_hold_across_hosts(sim, tmp_path):
    # A key with concurrency 1, in every host's keys file: a stream open at one host refuses
    # the key at the other with the one-host answer (429 rate_limit_exceeded), both ways.
    # The leader runs one edge worker (it counts at the Metrics actor once a member has
    # joined), the member two; the member's file also has a key the leader's lacks.
    from edge.api_keys import hash_key

    solo = {"id": "solo", "sha256": hash_key("sk-solo"), "concurrency": 1}
    extra = {"id": "member-only", "sha256": hash_key("sk-member-only")}
    leader_keys, member_keys = tmp_path / "leader-keys.json", tmp_path / "member-keys.json"
    leader_keys.write_text(json.dumps({"keys": [solo]}))
    member_keys.write_text(json.dumps({"keys": [solo, extra]}))
    hosts = ("127.0.0.15", "127.0.0.16")
    per_host = {
        hosts[0]: {"SLUICE_API_KEYS_FILE": str(leader_keys)},
        hosts[1]: {"SLUICE_API_KEYS_FILE": str(member_keys), "SLUICE_WORKERS": "2"},
    }
    env = {"SIMULATED_RPS": "50", "SIMULATED_BURST": "50"}
    with running_cluster(sim, hosts=hosts, per_host=per_host, **env) as cluster:
        leader, member = cluster
        wait_until(lambda: "counted cluster-wide" in leader.output(), timeout=30, message="the leader counts shared")
        key = {"authorization": "Bearer sk-solo"}

        def hold(gw: Gateway) -> SSEClient | None:
            """A long stream of the key at `gw` (None: still refused, the previous stream's
            end not counted yet: it travels in the edge's record batch)."""
            long = chat_body(f"solo {uuid.uuid4().hex}\n#sim tokens=1500 token_interval_ms=20")
            client = SSEClient(gw.url + "/api/chat", long, key, timeout=60)
            if client.status == 200:
                return client
            client.close()
            return None

        for holder, other in ((leader, member), (member, leader)):
            stream = wait_until(lambda: hold(holder), timeout=20, interval=0.1, message="the key's stream admitted")
            try:
                while (event := stream.next()) is not None and not (
                    event[0] == "message" and event[1]["type"] == "delta"
                ):
                    pass
                for gw in (other, other, holder):  # the member: either of its workers
                    status, _, body = request("POST", gw.url + "/api/chat", chat_body("solo again"), headers=key)
                    assert status == 429, (gw.host, body)
                    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded", body
            finally:
                stream.close()

            def admitted_again(gw=other) -> bool:
                return (
                    request("POST", gw.url + "/api/chat", chat_body("solo after\n#sim tokens=1"), headers=key)[0] == 200
                )

            wait_until(admitted_again, timeout=20, interval=0.1, message="the closed stream no longer counted")
        # Any host serves the keys of its own file.
        member_only = {"authorization": "Bearer sk-member-only"}
        assert (
            request("POST", member.url + "/api/chat", chat_body("mine\n#sim tokens=1"), headers=member_only)[0] == 200
        )
        assert (
            request("POST", leader.url + "/api/chat", chat_body("mine\n#sim tokens=1"), headers=member_only)[0] == 401
        )


def test_a_member_restarted_at_its_address_before_its_loss_is_noticed_serves_again(sim):
    # kill -9 of a member and a new run.py at the same address at once, well within the
    # ~3 s the leader takes to notice a silent member: Thespian's leader hears the new
    # incarnation's first registration, forgets the old one (its actors exited) and adds the
    # new one (docs/scale-out.md, "Losing a host"). Its Pools and shard must work again, the
    # old incarnation's leases come back, and no address of it stays in the directory.
    with running_cluster(sim, hosts=("127.0.0.15", "127.0.0.16"), SIMULATED_RPS="50", SIMULATED_BURST="50") as hosts:
        leader, member = hosts
        here = f"{member.host}:{member.actor_port}"
        wait_until(lambda: members(leader)[here]["shards"] == ["coalescer:1"], timeout=30, message="its shard")
        old_pids = {role: actor_pid(leader, role) for role in ("pool:1", "coalescer:1")}
        assert all(pid in descendants(member.proc.pid) for pid in old_pids.values()), old_pids
        # A call whose key the member's shard holds, in flight when it dies.
        held, _ = stream_on_shard(
            leader, "coalescer:1", lambda tag: chat_body(f"held {tag}\n#sim tokens=400 token_interval_ms=50")
        )
        while (event := held.next()) is not None and not (event[0] == "message" and event[1]["type"] == "delta"):
            pass
        listings: list[tuple[float, dict]] = []
        watching = threading.Event()

        def watch() -> None:  # what the leader lists, as often as it answers
            while not watching.is_set():
                try:
                    listings.append((time.monotonic(), members(leader)))
                except Exception:
                    pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        signal_tree(member, signal.SIGKILL)
        killed_at = time.monotonic()
        member.proc.wait(10)
        again = same_address(member)
        hosts.append(again)
        again.start(60)
        print(f"member restarted at its address, ready {time.monotonic() - killed_at:.2f} s after its SIGKILL")

        def serving() -> bool:
            listed = members(leader).get(here)
            if listed is None or listed["shards"] != ["coalescer:1"] or len(listed["pools"]) != 1:
                return False
            pids = {role: actor_pid(leader, role) for role in ("coalescer:1", *listed["pools"])}
            return all(pid in descendants(again.proc.pid) for pid in pids.values())

        wait_until(serving, timeout=60, message="the new incarnation's Pool and shard placed on it")
        print(f"its Pool and shard on the new incarnation {time.monotonic() - killed_at:.2f} s after its SIGKILL")
        watching.set()
        watcher.join(10)
        # Whether the restart beat the detection (~3 s) depends on this box's load: printed,
        # not asserted; what follows must hold either way. (A loss and a join that come
        # together may still show one empty listing between them.)
        gone = [round(at - killed_at, 2) for at, listing in listings if listing == {}]
        print(f"the leader listed no member {len(gone)} times of {len(listings)}, from {gone[:1]} s after the SIGKILL")
        # No address of the old incarnation is left in the directory: its Pool is gone.
        status, ready = get_json(leader.url + "/readyz")
        assert status == 200 and "pool:1" not in ready["actors"], ready
        assert all(alive(actor["pid"]) for actor in ready["actors"].values() if actor.get("pid")), ready
        # The held call's client got an error event, no hang; its lease came back.
        [events] = finish([held])
        errors = [e["code"] for e in data_events(events) if e["type"] == "error"]
        assert errors in (["coalescer_lost"], ["hub_disconnected"]), data_events(events)[-3:]
        wait_until(
            lambda: sum(p["in_flight"] for p in admin_state(leader, "pacer")["pacer:simulated"]["pools"].values()) == 0,
            timeout=20,
            message="the dead incarnation's leases back in the budget",
        )
        # The restarted member serves, on its own shard too, and identical requests at both
        # hosts for a key of its shard still make one upstream call.
        status, _, events = stream_chat(again.url + "/api/chat", chat_body(f"back {uuid.uuid4().hex}\n#sim tokens=3"))
        assert status == 200 and data_events(events)[-1]["type"] == "done"
        first, body = stream_on_shard(
            again, "coalescer:1", lambda tag: chat_body(f"rejoined {tag}\n#sim ttft_ms=2000 tokens=4")
        )
        others = [SSEClient((leader, again)[i % 2].url + "/api/chat", body, timeout=60) for i in range(4)]
        results = finish([first, *others])
        assert all(data_events(events)[-1]["type"] == "done" for events in results)
        assert len(calls_for(sim, body["messages"][-1]["content"].split("\n")[0])) == 1
