"""A standby leader (docs/scale-out.md, "A standby leader"): three real run.py hosts on
127.0.0.31-33, every one started with the same `SLUICE_JOIN=A,B` (the leader candidates in
order), one simulated provider process counting the upstream calls.

- A (first in the list, up first) leads; B (the standby) and C follow it;
- A killed with SIGKILL mid-stream: every stream at B and C ends (done, or an error event:
  never a hang); B takes the lead (the takeover time is printed) and C follows it; a new
  request at each surviving host is served; RPS=1 BURST=1 still spaces the upstream calls
  1 s apart across the survivors;
- A restarted at its address joins B as a member: it does not take the lead back;
- Ctrl-C of every host leaves no process and no port.
"""

from __future__ import annotations

import signal
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import (
    Gateway,
    SSEClient,
    chat_body,
    data_events,
    descendants,
    ends_when_read,
    read_in_background,
    request,
    stream_chat,
    wait_until,
)
from tests.test_scale_out import (
    admin_state,
    calls_for,
    cluster_env,
    members,
    same_address,
    signal_tree,
    stop_hosts,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@contextmanager
def standby_cluster(sim: str, hosts: tuple[str, ...], **extra: str):
    """Hosts started in order, each with SLUICE_JOIN = the first two (the candidates); on exit
    every host gets Ctrl-C and nothing of any may be left."""
    gateways = [Gateway(cluster_env(sim, **extra), host) for host in hosts]
    candidates = ",".join(f"{gw.host}:{gw.actor_port}" for gw in gateways[:2])
    started: list[Gateway] = []
    try:
        for gw in gateways:
            gw.env["SLUICE_JOIN"] = candidates
            started.append(gw.start(60))
            gw.sim = sim
        wait_until(lambda: len(members(gateways[0])) == len(hosts) - 1, timeout=30, message="every member listed")
        yield started
    except BaseException:
        for gw in started:  # what each host logged: who led, who followed whom
            lines = Path(gw.log_path).read_text(errors="replace").splitlines()
            print(f"===== {gw.host}", *[line for line in lines if "sluice.access" not in line][-40:], sep="\n")
        raise
    finally:
        stop_hosts(started)


def address(gw: Gateway) -> str:
    return f"{gw.host}:{gw.actor_port}"


def leads(gw: Gateway) -> bool:
    """Whether the Supervisor that `gw`'s edge reaches runs on `gw` itself."""
    try:
        status, _, _ = request("GET", gw.url + "/readyz", timeout=5)
        pid = admin_state(gw, "supervisor")["supervisor"]["pid"] if status == 200 else None
    except Exception:  # its edge answers 503 (or slowly) while it finds no Supervisor
        return False
    return pid in descendants(gw.proc.pid)


def ready(gw: Gateway) -> bool:
    try:
        return request("GET", gw.url + "/readyz", timeout=5)[0] == 200
    except Exception:
        return False


def served(gw: Gateway, tag: str) -> bool:
    status, _, events = stream_chat(gw.url + "/api/chat", chat_body(f"{tag} {uuid.uuid4().hex}\n#sim tokens=3"))
    return status == 200 and data_events(events)[-1]["type"] == "done"


def test_a_standby_takes_over_from_a_killed_leader_and_the_old_leader_rejoins_as_a_member(sim):
    hosts = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
    with standby_cluster(sim, hosts, SIMULATED_RPS="1", SIMULATED_BURST="1", SIMULATED_CONCURRENCY="20") as cluster:
        a, b, c = cluster
        assert leads(a) and not leads(b) and not leads(c)
        assert sorted(members(a)) == sorted([address(b), address(c)])

        # Streams in flight at the two survivors' edges when the leader dies.
        text = f"inflight {uuid.uuid4().hex}"
        clients = [
            SSEClient(
                (b, c)[i % 2].url + "/api/chat",
                chat_body(f"{text} {i}\n#sim tokens=300 token_interval_ms=20"),
                timeout=90,
            )
            for i in range(4)
        ]
        assert [client.status for client in clients] == [200] * 4
        for client in clients:
            while (event := client.next()) is not None and not (event[0] == "message" and event[1]["type"] == "delta"):
                pass
        ends, threads = read_in_background(clients)
        signal_tree(a, signal.SIGKILL)
        killed_at = time.monotonic()
        a.proc.wait(10)

        # B, the standby, takes the lead; C follows it; both edges serve again.
        wait_until(lambda: leads(b), timeout=60, interval=0.2, message="the standby leads")
        wait_until(lambda: members(b) and address(c) in members(b), timeout=60, interval=0.2, message="C follows B")
        wait_until(lambda: ready(b) and ready(c), timeout=60, interval=0.2, message="both survivors ready")
        print(
            f"standby leading, the other member listed and both ready {time.monotonic() - killed_at:.2f} s after SIGKILL"
        )

        # Every stream in flight ended at its client: done, or an error event, never a hang.
        kinds = ends_when_read(ends, threads, clients, 60)
        print(f"in-flight streams at the survivors ended: {kinds}")
        assert len(kinds) == 4 and all(
            kind == "done:" or (kind.startswith("error:") and kind != "error:") for kind in kinds
        )

        # A new request at each surviving host is served.
        assert served(b, "after at b") and served(c, "after at c")

        # One budget still: 1 call/s, no burst, across the survivors (the new Pacer on B).
        paced = f"paced {uuid.uuid4().hex}"
        bodies = [((b, c)[i % 2], chat_body(f"{paced} {i}\n#sim ttft_ms=10 tokens=2")) for i in range(4)]
        pacing = [SSEClient(gw.url + "/api/chat", body, timeout=60) for gw, body in bodies]
        results = []
        for client in pacing:
            try:
                results.append((client.status, client.read_all()))
            finally:
                client.close()
        assert [status for status, _ in results] == [200] * 4
        started = sorted(r["started_at"] for r in calls_for(sim, paced))
        gaps = [round(later - earlier, 3) for earlier, later in zip(started, started[1:])]
        print(f"upstream calls after the takeover started {gaps} s apart")
        assert len(started) == 4 and min(gaps) >= 0.9, gaps

        # A restarted at its address finds B leading and joins it as a member.
        again = same_address(a)
        cluster.append(again)
        restarted = time.monotonic()
        again.start(60)
        wait_until(lambda: address(again) in members(b), timeout=60, message="the old leader listed as B's member")
        print(f"the old leader a member of the new one {time.monotonic() - restarted:.2f} s after its restart")
        assert leads(b) and not leads(again)
        assert served(again, "at the old leader")
