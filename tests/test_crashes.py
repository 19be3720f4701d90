"""Crash-consistent state (docs/reliability.md, "Process crashes"): SIGKILL one of
sluice's own processes under load and check that what it held is reclaimed at once.

Real processes throughout: run.py with its actor system and simulated provider (the
`Gateway` helper), pids from `/readyz`, `os.kill(pid, SIGKILL)`. Deadlines are poll
timeouts, generous for a loaded 2-core machine; the measured times are printed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from typing import NamedTuple

import pytest

from actors.system import alive, descendants, process_table
from tests.support import (
    Gateway,
    SSEClient,
    chat_body,
    data_events,
    get_json,
    request,
    running_gateway,
    stop_leaving_nothing,
    wait_until,
)

TOKEN = "crash-test-token"
LONG = "#sim ttft_ms=50 tokens=2000 token_interval_ms=20"  # 40 s: still streaming when killed
GATEWAY_ENV = {
    "SIMULATED_CONCURRENCY": "4",
    "SIMULATED_RPS": "50",
    "SIMULATED_BURST": "50",
    "SLUICE_ADMIN_TOKEN": TOKEN,
}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def actors(gw) -> dict:
    status, body = get_json(gw.url + "/readyz")
    return body.get("actors", {}) if status == 200 else {}


def pid_of(gw, role: str) -> int:
    return wait_until(lambda: actors(gw).get(role, {}).get("pid"), timeout=20, message=f"{role} ready")


def pacer_state(gw) -> dict:
    status, _, body = request(
        "GET", gw.url + "/api/admin/state?role=pacer", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, body
    return json.loads(body)["results"]["pacer:simulated"]


def kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


class OpenStreams:
    """`n` long streams, each read on a thread of its own until its terminal event."""

    def __init__(self, gw, n: int, text: str):
        self.bodies = [chat_body(f"{text} {i}\n{LONG}") for i in range(n)]
        self.clients, self.threads, self.ends = [], [], {}
        for body in self.bodies:
            client = SSEClient(gw.url + "/api/chat", body, timeout=60)
            assert client.status == 200
            self.clients.append(client)
        for client in self.clients:
            thread = threading.Thread(target=self._read, args=(client,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _read(self, client) -> None:
        try:
            client.read_all()
        except Exception as exc:  # a dropped connection is a failure the test reports
            client.events.append(("message", {"type": "transport_error", "message": str(exc)}))
        self.ends[id(client)] = time.monotonic()

    def wait_streaming(self) -> None:
        wait_until(
            lambda: all(any(d.get("type") == "delta" for d in data_events(list(c.events))) for c in self.clients),
            timeout=30,
            message="every stream to have its first delta",
        )

    def wait_ended(self, timeout: float = 20.0) -> list[dict]:
        for thread in self.threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client is still waiting: a hang"
        for client in self.clients:
            client.close()
        return [data_events(c.events)[-1] for c in self.clients]

    def close(self) -> None:
        for client in self.clients:
            client.close()


def serves(gw, text: str) -> bool:
    client = SSEClient(gw.url + "/api/chat", chat_body(f"{text}\n#sim tokens=3"), timeout=30)
    try:
        return client.status == 200 and data_events(client.read_all())[-1]["type"] == "done"
    finally:
        client.close()


def streams_afresh(gw, body: dict) -> bool:
    """`body` gets a live upstream call: a delta arrives (then the client leaves)."""
    client = SSEClient(gw.url + "/api/chat", body, timeout=15)
    try:
        if client.status != 200:
            return False
        while (event := client.next()) is not None:
            if event[0] == "message" and event[1]["type"] == "delta":
                return True
            if event[0] == "message" and event[1]["type"] in ("error", "done"):
                return False
        return False
    finally:
        client.close()


def answers_promptly(gw, text: str, within_s: float):
    """A new request gets its response (200 or a JSON error) within `within_s`:
    (seconds to the response headers, final event type or HTTP status)."""
    started = time.monotonic()
    client = SSEClient(gw.url + "/api/chat", chat_body(f"{text}\n#sim tokens=3"), timeout=within_s)
    try:
        elapsed = time.monotonic() - started
        if client.status != 200:
            return elapsed, client.status
        return elapsed, data_events(client.read_all())[-1]["type"]
    finally:
        client.close()


def supervisor_pid(gw) -> int | None:
    try:
        status, _, body = request(
            "GET", gw.url + "/api/admin/state?role=supervisor", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5
        )
    except Exception:
        return None
    return json.loads(body)["results"]["supervisor"]["pid"] if status == 200 else None


# --- the tests ---------------------------------------------------------------------------------


def test_a_killed_pool_gives_back_every_lease_and_flight_three_times_over():
    with running_gateway(GATEWAY_ENV) as gw:
        for round_ in range(3):
            streams = OpenStreams(gw, 12, f"pool round {round_} {uuid.uuid4()}")  # 4 streaming, 8 queued
            wait_until(lambda: pacer_state(gw)["in_flight"] == 4, timeout=20, message="every slot taken")
            killed_at = kill(pid_of(gw, "pool"))
            last = streams.wait_ended()
            assert {e["type"] for e in last} == {"error"}, last  # a terminal event each, no hang
            print(
                f"round {round_}: clients ended {max(streams.ends.values()) - killed_at:.2f} s after the kill, codes {sorted({e['code'] for e in last})}"
            )

            wait_until(
                lambda: pacer_state(gw)["in_flight"] == 0 and pacer_state(gw)["queue_depth"] == 0,
                timeout=15,
                message="the dead Pool's leases back",
            )
            print(f"round {round_}: leases back {time.monotonic() - killed_at:.2f} s after the kill")

            # The very prompt of a killed stream: a fresh call, not a join of the dead one.
            wait_until(
                lambda: streams_afresh(gw, streams.bodies[0]),
                timeout=15,
                interval=0.1,
                message="the killed stream's prompt to stream afresh",
            )
            print(f"round {round_}: the same prompt streams {time.monotonic() - killed_at:.2f} s after the kill")
        # No 429 from leaked concurrency: every slot of CONCURRENCY=4 is free after three kills.
        wait_until(lambda: pacer_state(gw)["in_flight"] == 0, timeout=15, message="idle")
        again = OpenStreams(gw, 4, f"after the kills {uuid.uuid4()}")
        again.wait_streaming()
        assert pacer_state(gw)["in_flight"] == 4
        again.close()


@pytest.mark.parametrize("role", ["pacer:simulated", "coalescer:0", "coalescer:1"])
def test_a_killed_pacer_or_shard_leaves_no_request_without_an_answer(role):
    with running_gateway(GATEWAY_ENV) as gw:
        before = pid_of(gw, role)
        killed_at = kill(before)
        # Requests right after the kill, spread over both shards: each gets an answer
        # (a stream or a clear error) within a few seconds, never a silent wait.
        results = [answers_promptly(gw, f"after {role} {i} {uuid.uuid4()}", within_s=8) for i in range(6)]
        print(f"{role}: answers after the kill {[(round(t, 2), r) for t, r in results]}")
        # Re-admitted: the edge follows the role to its replacement, the coalescers re-ask
        # a replaced Pacer; no error at all.
        assert [r for _, r in results] == ["done"] * 6, results
        wait_until(
            lambda: actors(gw).get(role, {}).get("pid") not in (None, before), timeout=20, message=f"{role} recreated"
        )
        wait_until(lambda: serves(gw, f"recovered {uuid.uuid4()}"), timeout=15, interval=0.1, message="serving again")
        print(f"{role}: serving again {time.monotonic() - killed_at:.2f} s after the kill")
        wait_until(lambda: pacer_state(gw)["in_flight"] == 0, timeout=10, message="no lease held")


def test_a_killed_pacer_re_asks_for_the_flights_that_waited_at_it():
    with running_gateway({**GATEWAY_ENV, "SIMULATED_CONCURRENCY": "1"}) as gw:
        holder = OpenStreams(gw, 1, f"holds the only slot {uuid.uuid4()}")
        holder.wait_streaming()
        queued = SSEClient(gw.url + "/api/chat", chat_body(f"queued {uuid.uuid4()}\n#sim tokens=3"), timeout=30)
        assert queued.status == 200  # admitted while queued at the Pacer
        wait_until(lambda: pacer_state(gw)["queue_depth"] == 1, timeout=10, message="the request queued")
        kill(pid_of(gw, "pacer:simulated"))
        # The new Pacer has every slot free and the re-asked lease gets one at once.
        assert data_events(queued.read_all())[-1]["type"] == "done", queued.events
        queued.close()
        holder.close()


def test_a_replaced_supervisor_still_repairs_and_a_killed_run_py_leaves_nothing():
    with running_gateway(GATEWAY_ENV) as gw:
        supervisor = wait_until(lambda: supervisor_pid(gw), timeout=10, message="the Supervisor's pid")
        killed_at = kill(supervisor)
        wait_until(lambda: supervisor_pid(gw) not in (None, supervisor), timeout=30, message="a new Supervisor")
        wait_until(
            lambda: request("GET", gw.url + "/readyz")[0] == 200, timeout=30, interval=0.1, message="readyz back to 200"
        )
        print(f"readyz 200 again {time.monotonic() - killed_at:.2f} s after the Supervisor's kill")

        pool = pid_of(gw, "pool")
        kill(pool)  # repaired only by a live Supervisor
        wait_until(lambda: actors(gw).get("pool", {}).get("pid") not in (None, pool), timeout=20, message="a new Pool")
        wait_until(lambda: serves(gw, f"after both {uuid.uuid4()}"), timeout=15, interval=0.1, message="serving again")

        gw.tree |= descendants(gw.proc.pid)  # the new Supervisor and Pool, the watchdog
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=30, message="no process or port left")


def supervisor_state(gw) -> dict | None:
    try:
        status, _, body = request(
            "GET", gw.url + "/api/admin/state?role=supervisor", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5
        )
    except Exception:  # the edge is between Supervisors
        return None
    return json.loads(body)["results"]["supervisor"] if status == 200 else None


def group_members(group: int) -> set[int]:
    """The live processes of the actor system's process group (its admin and every actor,
    orphans included: they keep the group when their Supervisor dies)."""
    return {pid for pid, proc in process_table().items() if proc.group == group and proc.state not in ("Z", "X")}


def test_a_replaced_supervisor_adopts_every_actor_and_leaves_no_second_one():
    """The Supervisor SIGKILLed at once after start (before run.py's keeper had looked at
    its directory, before the fix): the new one adopts every actor (the same pids), no
    actor of any role runs twice (the group holds what it held, the new Supervisor for the
    old), and a normal shutdown leaves nothing."""
    with running_gateway(GATEWAY_ENV) as gw:
        before = wait_until(lambda: supervisor_state(gw), timeout=10, message="the Supervisor's state")
        group = os.getpgid(before["pid"])
        members = group_members(group)
        assert set(before["pids"].values()) | {before["pid"]} <= members
        kill(before["pid"])
        after = new_supervisor(gw, before["pid"])
        assert after["pids"] == before["pids"], "an actor was recreated instead of adopted"
        expected = (members - {before["pid"]}) | {after["pid"]}
        serves_with_one_process_per_role(gw, group, expected, "after the Supervisor")


def new_supervisor(gw, old_pid: int) -> dict:
    """The replacement Supervisor's state, once every actor it wired is ready."""
    return wait_until(
        lambda: (s := supervisor_state(gw)) and s["pid"] != old_pid and s["ready"] and s,
        timeout=30,
        message="a new Supervisor with every actor ready",
    )


def serves_with_one_process_per_role(gw, group: int, expected: set[int], prompt: str) -> None:
    """The group settles to `expected` (one process per role), a request is served, no
    second actor of any role appears meanwhile, and a normal shutdown stops them all."""
    wait_until(lambda: group_members(group) == expected, timeout=15, message="one process per role")
    assert serves(gw, f"{prompt} {uuid.uuid4()}")
    assert group_members(group) == expected, "a second actor of some role appeared"
    stopped_without_sigkill(gw, group)


def stopped_without_sigkill(gw, group: int) -> None:
    """A normal shutdown (SIGINT) reaches every actor: none is left for the SIGKILL that
    follows the grace (actors/system.py `kill_group` logs it)."""
    assert gw.stop() == 0
    assert group_members(group) == set()
    assert "after the shutdown: SIGKILL" not in gw.output(), gw.output()


def test_a_supervisor_killed_after_it_recreated_a_pool_hands_the_new_pool_on():
    """The Supervisor SIGKILLed ~0.3 s after it recreated a Pool: run.py's keeper (it looks
    every second) most likely still remembers the dead Pool. The adopted actors' previous
    directory names the live one: it is adopted, not created a second time."""
    with running_gateway(GATEWAY_ENV) as gw:
        before = wait_until(lambda: supervisor_state(gw), timeout=10, message="the Supervisor's state")
        group = os.getpgid(before["pid"])
        members = group_members(group)
        kill(before["pids"]["pool"])
        repaired = wait_until(
            lambda: (s := supervisor_state(gw)) and s["pids"].get("pool") not in (None, before["pids"]["pool"]) and s,
            timeout=20,
            interval=0.02,
            message="the Pool recreated",
        )
        kill(before["pid"])
        after = new_supervisor(gw, before["pid"])
        assert after["pids"] == repaired["pids"], "an actor was recreated instead of adopted"
        expected = (members - {before["pid"], before["pids"]["pool"]}) | {after["pid"], repaired["pids"]["pool"]}
        serves_with_one_process_per_role(gw, group, expected, "after the Pool and the Supervisor")


class StoppedSupervisor(NamedTuple):
    group: int  # its actor system's process group
    pid: int
    admin: int  # its parent
    actors: set[int]  # the actors it had created when it was stopped


def supervisor_with_an_actor(run_py: int, skip: frozenset[int]) -> StoppedSupervisor | None:
    """run.py's Supervisor, SIGSTOPped, once it has created an actor (None: not yet).
    Found by the process tree, as nothing names the processes: run.py's daemonizing child
    leads the actor system's process group (a group in `skip` is passed over); in it the
    admin's parent is outside the group, the Supervisor is the admin's child with children
    of its own (the actors it creates; no other actor creates one)."""
    table = process_table()
    # the group's leader is a zombie: looked up with the dead, the members among the living
    groups = {pid for pid, p in table.items() if p.parent == run_py and p.group == pid} - skip
    members = {pid: p for pid, p in table.items() if p.group in groups and p.state not in ("Z", "X")}
    for pid, proc in members.items():
        children = {child for child, p in members.items() if p.parent == pid}
        if proc.parent in members and children:
            os.kill(pid, signal.SIGSTOP)  # as soon as found: its other actors are forked meanwhile, not up
            actors = {child for child, p in process_table().items() if p.parent == pid}
            return StoppedSupervisor(proc.group, pid, proc.parent, actors)
    return None


def kill_supervisor_before_its_actors_are_up(gw, skip: frozenset[int] = frozenset()) -> StoppedSupervisor:
    """SIGKILL run.py's Supervisor after it created its first actors, long before they
    are all up (the directory is complete ~0.6 s after the first fork on an idle machine;
    the Supervisor is stopped within a poll of it, then killed)."""
    stopped = wait_until(
        lambda: supervisor_with_an_actor(gw.proc.pid, skip),
        timeout=30,
        interval=0.001,
        message="run.py's Supervisor with an actor",
    )
    gw.tree |= stopped.actors | {stopped.pid, stopped.admin}
    os.kill(stopped.pid, signal.SIGKILL)
    print(f"the Supervisor {stopped.pid} killed with {len(stopped.actors)} actor(s) created")
    return stopped


def test_a_supervisor_killed_before_its_actors_are_up_leaves_no_second_actor_of_any_role():
    """The Supervisor killed during startup, before any directory was complete: no
    replacement can adopt its actors (nobody knows them all), so run.py stops that actor
    system (they go with it) and starts a new one; it serves with one process per role."""
    gw = Gateway(GATEWAY_ENV).launch()
    try:
        first = kill_supervisor_before_its_actors_are_up(gw)
        gw.wait_serving(60)
        wait_until(
            lambda: not any(alive(pid) for pid in first.actors),
            timeout=15,
            message="the dead Supervisor's actors to be gone",
        )
        after = new_supervisor(gw, first.pid)
        group = os.getpgid(after["pid"])
        assert group != first.group, "the actor system was not started again"
        expected = {process_table()[after["pid"]].parent, after["pid"], *after["pids"].values()}
        serves_with_one_process_per_role(gw, group, expected, "after the lost start")
    finally:
        stop_leaving_nothing(gw)


def test_a_supervisor_lost_before_its_actors_are_up_twice_ends_run_py_with_a_clear_error():
    """Lost at the start and at the start again: run.py gives up (exit 1, the reason in its
    log), and neither actor system leaves a process or a port behind."""
    gw = Gateway(GATEWAY_ENV).launch()
    try:
        first = kill_supervisor_before_its_actors_are_up(gw)
        kill_supervisor_before_its_actors_are_up(gw, skip=frozenset({first.group}))
        assert gw.proc.wait(60) == 1, gw.output()
        lines = [line for line in gw.output().splitlines() if "died before every actor was up" in line]
        assert len(lines) == 2 and lines[1].endswith("giving up"), gw.output()
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=15, message="no process or port left")
    finally:
        gw.stop()
        gw.kill_leftovers()


# --- the Metrics actor and the thread store (issue 11's remaining kills) -----------------------

WIDE = {**GATEWAY_ENV, "SIMULATED_CONCURRENCY": "40"}  # all 20 streams run at once


def deltas(client) -> int:
    return sum(1 for d in data_events(list(client.events)) if d.get("type") == "delta")


def test_a_killed_metrics_actor_leaves_the_streams_alone_and_is_replaced():
    """Metrics has no clients: the 20 streams open when it dies go on streaming; the
    replacement answers /api/metrics/performance again; new requests are served."""
    with running_gateway(WIDE) as gw:
        streams = OpenStreams(gw, 20, f"metrics {uuid.uuid4()}")
        streams.wait_streaming()
        before = pid_of(gw, "metrics")
        killed_at = kill(before)
        seen = [deltas(c) for c in streams.clients]
        wait_until(
            lambda: actors(gw).get("metrics", {}).get("pid") not in (None, before),
            timeout=20,
            message="metrics recreated",
        )
        replaced = time.monotonic() - killed_at
        wait_until(
            lambda: serves(gw, f"after metrics {uuid.uuid4()}"), timeout=15, interval=0.1, message="serving again"
        )
        serving = time.monotonic() - killed_at
        wait_until(
            lambda: request("GET", gw.url + "/api/metrics/performance?last_n=10")[0] == 200,
            timeout=15,
            interval=0.1,
            message="the new Metrics actor answers",
        )
        # every stream still streams: more deltas than when Metrics died, and no end yet
        wait_until(
            lambda: all(deltas(c) > n for c, n in zip(streams.clients, seen)),
            timeout=15,
            message="every stream to go on after the kill",
        )
        assert not streams.ends, "a stream ended when Metrics died"
        print(f"metrics: replaced {replaced:.2f} s, serving {serving:.2f} s after the kill; 20/20 streams went on")
        streams.close()
        wait_until(lambda: pacer_state(gw)["in_flight"] == 0, timeout=15, message="no lease held")


def test_a_killed_thread_store_ends_each_turn_clearly_and_serves_again():
    """20 streams open (10 thread turns, 10 plain chats) when the thread store dies: every
    client gets its terminal event (the reply finishes: the Pool does not need the store);
    each reply is then stored as done (the new store marked it interrupted on start, the
    final write replaces that) or as an error, never left streaming or lost; the store
    serves new threads again."""
    with running_gateway(WIDE) as gw:
        threads = []
        for _ in range(10):
            status, _, raw = request("POST", gw.url + "/api/threads")
            assert status == 201, raw
            threads.append(json.loads(raw)["thread_id"])
        short = "#sim ttft_ms=50 tokens=150 token_interval_ms=20"  # 3 s: the kill lands mid-reply
        clients = [
            SSEClient(f"{gw.url}/api/threads/{t}/messages", {"content": f"turn {uuid.uuid4()}\n{short}"}, timeout=30)
            for t in threads
        ]
        clients += [
            SSEClient(gw.url + "/api/chat", chat_body(f"chat {i} {uuid.uuid4()}\n{short}"), timeout=30)
            for i in range(10)
        ]
        assert all(c.status == 200 for c in clients)
        ends: dict[int, float] = {}

        def read(client) -> None:
            try:
                client.read_all()
            except Exception as exc:
                client.events.append(("message", {"type": "transport_error", "message": str(exc)}))
            ends[id(client)] = time.monotonic()

        readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in clients]
        for reader in readers:
            reader.start()
        wait_until(lambda: all(deltas(c) > 0 for c in clients), timeout=30, message="every stream streaming")
        before = pid_of(gw, "threads")
        killed_at = kill(before)
        # while the replies stream on: when does the store serve again?
        wait_until(
            lambda: request("POST", gw.url + "/api/threads")[0] == 201,
            timeout=15,
            interval=0.05,
            message="the thread store serves again",
        )
        serving = time.monotonic() - killed_at
        for reader in readers:
            reader.join(30)
        assert not any(r.is_alive() for r in readers), "a client is still waiting: a hang"
        last = [data_events(c.events)[-1] for c in clients]
        for client in clients:
            client.close()
        assert all(e["type"] in ("done", "error") for e in last), last
        assert all(e["type"] == "done" for e in last[10:]), last[10:]  # plain chats never needed the store

        stored = []
        for thread, event in zip(threads, last[:10]):
            status, body = get_json(f"{gw.url}/api/threads/{thread}/messages")
            assert status == 200, body
            roles = [msg["role"] for msg in body["messages"]]
            assert roles == ["user", "assistant"], body  # the turn is there: never lost
            reply = body["messages"][1]
            stored.append(reply["status"])
            assert reply["status"] in ("done", "error", "interrupted"), reply
            if event["type"] == "done":
                assert reply["status"] == "done" and reply["content"], reply
        codes = sorted({e.get("code", "done") for e in last[:10]})
        print(
            f"threads: turns ended {[round(ends[id(c)] - killed_at, 2) for c in clients[:10]]} s after the kill, "
            f"terminal {codes}, stored {sorted(stored)}; serving again {serving:.2f} s after the kill"
        )
        wait_until(lambda: pacer_state(gw)["in_flight"] == 0, timeout=15, message="no lease held")
