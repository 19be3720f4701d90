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
    data_events,
    descendants,
    get_json,
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
        for gw in reversed(started):  # members first: the leader sees them leave
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
    with running_cluster(
        sim,
        per_host={HOSTS[2]: {"SLUICE_WORKERS": "2"}},
        SIMULATED_RPS="1",
        SIMULATED_BURST="1",
        SIMULATED_CONCURRENCY="20",
    ) as hosts:
        yield hosts


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
    # Each Pool opens its HTTP/2 connection to the provider on its first call: three calls
    # one after the other (round-robin over equally idle Pools) so that no connection setup
    # shortens a gap measured at the provider.
    warm = f"warm {uuid.uuid4().hex}"
    for i in range(3):
        status, _, _ = request("POST", cluster[0].url + "/api/chat", chat_body(f"{warm} {i}\n#sim tokens=1"))
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
    assert len(started) == 6 and min(gaps) >= 0.9, gaps  # granted 1 s apart; the hop to a Pool jitters


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
        # Four streams from the leader's edge: the Pacer spreads them over both hosts' Pools.
        clients = [
            SSEClient(
                leader.url + "/api/chat", chat_body(f"{text} {i}\n#sim tokens=200 token_interval_ms=20"), timeout=60
            )
            for i in range(4)
        ]
        assert [c.status for c in clients] == [200] * 4
        for client in clients:
            while (event := client.next()) is not None and not (event[0] == "message" and event[1]["type"] == "delta"):
                pass
        pools = admin_state(leader, "pacer")["pacer:simulated"]["pools"]
        assert {r: p["in_flight"] for r, p in pools.items()} == {"pool": 2, "pool:1": 2}, pools
        ends: dict[int, dict] = {}

        def read(i: int, client: SSEClient) -> None:
            client.read_all()
            ends[i] = data_events(client.events)[-1]

        threads = [threading.Thread(target=read, args=(i, c), daemon=True) for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        victims = descendants(member.proc.pid) | {member.proc.pid}
        member.tree |= victims
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = time.monotonic()
        wait_until(lambda: members(leader) == {}, timeout=60, message="the leader notices the lost member")
        print(f"member loss noticed {time.monotonic() - killed_at:.2f} s after SIGKILL")
        for thread in threads:
            thread.join(30)
        for client in clients:
            client.close()
        assert not any(t.is_alive() for t in threads), "a client is still waiting"
        kinds = sorted(e["type"] + ":" + e.get("code", "") for e in ends.values())
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
        victims = descendants(leader.proc.pid) | {leader.proc.pid}
        leader.tree |= victims
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
    # Two shards (the default): a member that joins takes coalescer:1 from the leader.
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
        victims = descendants(member.proc.pid) | {member.proc.pid}
        member.tree |= victims
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
