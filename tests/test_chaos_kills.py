"""Kills the other crash tests do not make (docs/reliability.md, "Process crashes",
"Probed"): two processes at once, and a process frozen (SIGSTOP) before it is killed, on a
gateway with two edge workers and two Pools (SLUICE_WORKERS=2, SLUICE_POOLS=2).

Each client reads against a deadline of its own: it must end (done, one terminal error
event, or a JSON error response) and never wait on. Afterwards the Pacer holds nothing
(`in_flight`, `held`, `queue_depth`, per Pool) and new requests are served, coalesced.
Real processes throughout (`Gateway`, the simulated provider); pids from the admin state.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import pytest

from actors.system import alive
from tests import test_worker_relay as relay
from tests.support import SSEClient, chat_body, data_events, request, running_gateway, wait_until, worker_pids

TOKEN = "chaos-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
ENV = {
    "SLUICE_WORKERS": "2",
    "SLUICE_POOLS": "2",
    "SLUICE_ADMIN_TOKEN": TOKEN,
    "SIMULATED_RPS": "50",
    "SIMULATED_BURST": "50",
    "SIMULATED_CONCURRENCY": "40",
}
CLIENT_DEADLINE_S = 30.0  # far past any recovery here; a client still waiting then hangs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def admin_state(gw, role: str) -> dict | None:
    """The admin state of `role` (None while the edge cannot ask: between Supervisors)."""
    try:
        status, _, body = request("GET", gw.url + f"/api/admin/state?role={role}", headers=AUTH, timeout=5)
    except Exception:
        return None
    return json.loads(body)["results"] if status == 200 else None


def supervisor(gw) -> dict:
    return wait_until(lambda: (admin_state(gw, "supervisor") or {}).get("supervisor"), timeout=20, message="state")


def pacer_holds(gw) -> dict | None:
    """What the Pacer still counts: totals and per Pool."""
    state = (admin_state(gw, "pacer") or {}).get("pacer:simulated")
    if state is None:
        return None
    return {
        "in_flight": state["in_flight"],
        "held": state["held"],
        "queue_depth": state["queue_depth"],
        "pools": {r: (p["in_flight"], p["held"], p["queued"]) for r, p in state["pools"].items()},
    }


def holds_nothing(holds: dict | None) -> bool:
    return (
        holds is not None
        and holds["in_flight"] == holds["held"] == holds["queue_depth"] == 0
        and all(p == (0, 0, 0) for p in holds["pools"].values())
    )


class Client:
    """One request read to its end on a thread of its own: `outcome` is "done", an error
    event's "error:<code>", an error response's "http <status>:<code>", or the exception."""

    def __init__(self, gw, text: str):
        self.text = text
        self.outcome: str | None = None
        self.ended_at: float | None = None  # time.monotonic() when it ended
        self.sse: SSEClient | None = None
        self.thread = threading.Thread(target=self._run, args=(gw, text), daemon=True)
        self.thread.start()

    def _run(self, gw, text: str) -> None:
        try:
            # a connection of its own, so the kernel spreads the requests over both workers
            self.sse = SSEClient(
                gw.url + "/api/chat", chat_body(text), headers={"connection": "close"}, timeout=CLIENT_DEADLINE_S
            )
            if self.sse.status != 200:
                self.outcome = f"http {self.sse.status}:{json.loads(self.sse.body())['error']['code']}"
                return
            events = data_events(self.sse.read_all())
            ends = [e for e in events if e.get("type") in ("done", "error")]
            assert len(ends) == 1 and ends[0] is events[-1], events  # exactly one terminal event, last
            self.outcome = "done" if ends[0]["type"] == "done" else f"error:{ends[0]['code']}"
        except Exception as exc:  # noqa: BLE001 - the test reports it
            self.outcome = f"exception: {exc!r}"
        finally:
            self.ended_at = time.monotonic()

    def deltas(self) -> int:
        return 0 if self.sse is None else sum(1 for e in data_events(list(self.sse.events)) if e.get("type") == "delta")

    def streaming(self) -> bool:
        """A delta has arrived (or the request is over)."""
        if self.outcome is not None:
            return True
        return self.sse is not None and any(e.get("type") == "delta" for e in data_events(list(self.sse.events)))

    def end(self, by: float) -> str:
        self.thread.join(max(0.0, by - time.monotonic()))
        if self.sse is not None:
            self.sse.close()
        return "hang" if self.thread.is_alive() else str(self.outcome)


def served_coalesced(gw) -> list[str]:
    """Four identical requests and four distinct ones: the identical four share one flight."""
    text = f"afterwards {uuid.uuid4().hex}"
    slow = "#sim ttft_ms=300 tokens=5 token_interval_ms=50"  # in flight long enough for all four to join
    identical = [Client(gw, f"{text}\n{slow}") for _ in range(4)]
    distinct = [Client(gw, f"{text} {i}\n#sim tokens=3") for i in range(4)]
    by = time.monotonic() + CLIENT_DEADLINE_S
    outcomes = [c.end(by) for c in identical + distinct]
    roles = sorted(data_events(c.sse.events)[0].get("role", "") for c in identical if c.sse is not None)
    assert roles == ["follower"] * 3 + ["leader"], roles
    return outcomes


def test_a_supervisor_killed_while_a_pool_lies_dead_leaves_the_live_actors_wired():
    """The Supervisor frozen, a Pool SIGKILLed (nobody sees it die), then the Supervisor
    SIGKILLed: its replacement adopts the live actors and waits up to 3 s for the dead Pool
    before recreating it. Requests keep coming meanwhile. Each ends, the Pacer gets back
    every lease (those of the calls the live Pool ended during the adoption too), and the
    gateway serves as before. Failed before: the adoption Wire named only the actors that
    had answered it, so the live actors dropped what they sent meanwhile (a LeaseRelease:
    a lease held for good; an OpenStream or a LeaseRequest: a client waiting for a stream
    nobody would open)."""
    with running_gateway(ENV) as gw:
        # Streams of 1-4.75 s: those on the live Pool end while the adoption waits for the
        # dead one (their LeaseReleases must reach the Pacer); those on the dead Pool end
        # with `hub_disconnected`.
        lengths = [50 + 12 * i for i in range(16)]  # tokens, 20 ms apart
        running = [Client(gw, f"running {n} {uuid.uuid4().hex}\n#sim tokens={n} token_interval_ms=20") for n in lengths]
        wait_until(lambda: all(c.streaming() for c in running), timeout=20, message="every stream streaming")
        before = supervisor(gw)
        os.kill(before["pid"], signal.SIGSTOP)
        os.kill(before["pids"]["pool"], signal.SIGKILL)
        wait_until(lambda: not alive(before["pids"]["pool"]), timeout=10, message="the Pool dead")
        os.kill(before["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        clients = []
        while time.monotonic() - killed_at < 6.0:  # through the adoption and the Pool's recreation
            clients.append(Client(gw, f"during {len(clients)} {uuid.uuid4().hex}\n#sim tokens=3"))
            next_at = killed_at + 0.2 * len(clients)  # one request every 0.2 s
            wait_until(lambda: time.monotonic() >= next_at, interval=0.01, message="the next send")
        by = time.monotonic() + CLIENT_DEADLINE_S
        ended = sorted(c.end(by) for c in running)
        outcomes = [c.end(by) for c in clients]
        print(f"streams running at the kills: {ended}; requests after the kills: {outcomes}")
        assert set(ended) <= {"done", "error:hub_disconnected"}, ended
        # Placed on the dead Pool before anyone knew: a clear error (its hub unreachable, or
        # the stream failed there once the loss is announced); every other one is served.
        dead_pools = {"http 503:gateway_unavailable", "error:hub_disconnected", "error:pool_lost"}
        assert set(outcomes) <= {"done"} | dead_pools, outcomes
        assert outcomes.count("done") >= len(outcomes) // 2, outcomes
        after = supervisor(gw)
        assert after["pid"] != before["pid"] and after["pids"]["pool:1"] == before["pids"]["pool:1"], after
        wait_until(lambda: holds_nothing(pacer_holds(gw)), timeout=10, message="the Pacer holding nothing")
        assert served_coalesced(gw) == ["done"] * 8
        wait_until(lambda: holds_nothing(pacer_holds(gw)), timeout=10, message="the Pacer holding nothing again")


def flights_on(gw, shard: str) -> int:
    return len(((admin_state(gw, "coalescer") or {}).get(shard) or {}).get("in_flight", []))


def test_a_shard_frozen_then_killed_mid_stream_ends_only_its_own_flights_once():
    """Six flights, two of them with three identical followers each (spread over both
    workers), streaming when coalescer:0 is frozen and then SIGKILLed: each client of its
    flights gets exactly one `coalescer_lost` (the Pacer fails them at the Pool), every
    other client streams on to `done`, the Pacer holds nothing afterwards and the new shard
    coalesces again. Requests made while it is frozen are re-admitted at the replacement."""
    with running_gateway(ENV) as gw:
        text = uuid.uuid4().hex
        stream = "#sim ttft_ms=50 tokens=250 token_interval_ms=20"  # 5 s
        prompts = [f"shard {text} {i}\n{stream}" for i in range(6)]
        clients = [(p, Client(gw, p)) for p in prompts] + [(p, Client(gw, p)) for p in prompts[:2] for _ in range(3)]
        wait_until(lambda: all(c.streaming() for _, c in clients), timeout=20, message="every stream streaming")
        doomed = flights_on(gw, "coalescer:0")
        assert doomed + flights_on(gw, "coalescer:1") == 6
        shard = supervisor(gw)["pids"]["coalescer:0"]
        os.kill(shard, signal.SIGSTOP)
        # While it is frozen: new requests (those for it wait on their Submit), and the
        # streams go on for 100 deltas more, all told.
        late = [Client(gw, f"frozen {i} {uuid.uuid4().hex}\n#sim tokens=3") for i in range(4)]
        seen = sum(c.deltas() for _, c in clients)
        wait_until(lambda: sum(c.deltas() for _, c in clients) >= seen + 100, timeout=20, message="100 more deltas")
        os.kill(shard, signal.SIGKILL)
        by = time.monotonic() + CLIENT_DEADLINE_S
        late_outcomes = [c.end(by) for c in late]
        assert late_outcomes == ["done"] * 4, late_outcomes  # re-admitted at the replacement
        by_prompt: dict[str, set[str]] = {}
        for prompt, client in clients:
            by_prompt.setdefault(prompt, set()).add(client.end(by))
        outcomes = [sorted(o) for o in by_prompt.values()]
        print(f"flights on the killed shard: {doomed}; outcomes per prompt: {outcomes}")
        assert sorted(outcomes) == sorted([["error:coalescer_lost"]] * doomed + [["done"]] * (6 - doomed)), outcomes
        wait_until(lambda: holds_nothing(pacer_holds(gw)), timeout=10, message="the Pacer holding nothing")
        assert served_coalesced(gw) == ["done"] * 8


def queued_on(gw, shard: str) -> int:
    flights = ((admin_state(gw, "coalescer") or {}).get(shard) or {}).get("in_flight", [])
    return sum(1 for f in flights if f["phase"] == "queued")


@pytest.mark.parametrize(
    "first, gap_s",
    [("pacer:simulated", 0.0), ("pacer:simulated", 0.005), ("coalescer:0", 0.005)],
    ids=["together", "pacer-first", "shard-first"],
)
def test_a_pacer_killed_with_the_shard_that_queued_at_it_leaves_no_client_waiting(first, gap_s):
    """The double crash of docs/reliability.md: the Pacer and coalescer:0 SIGKILLed at the
    same instant (or a few ms apart) while flights of both shards wait in the Pacer's
    queue. coalescer:0's queued flights were known only to the two dead processes: each of
    their clients gets one `coalescer_lost` (the Pools hear the shard's death and end the
    streams it left unopened); coalescer:1's are re-asked at the new Pacer and served, and
    so are the calls already running. The Pacer holds nothing afterwards, and the lost
    prompts are served when asked again. Failed before: the lost clients waited for the
    hub's orphan timeout (91 s) and got `stream_not_started`."""
    with running_gateway({**ENV, "SIMULATED_CONCURRENCY": "2"}) as gw:
        text = uuid.uuid4().hex
        slot = "#sim ttft_ms=50 tokens=400 token_interval_ms=20"  # 8 s: both slots taken past the kill
        running = [Client(gw, f"holds a slot {text} {i}\n{slot}") for i in range(2)]
        wait_until(lambda: all(c.streaming() for c in running), timeout=20, message="both slots streaming")
        queued: list[Client] = []
        while len(queued) < 24 and not (queued_on(gw, "coalescer:0") and queued_on(gw, "coalescer:1")):
            queued += [Client(gw, f"queued {text} {len(queued) + i}\n#sim tokens=3") for i in range(4)]
            wait_until(
                lambda: (pacer_holds(gw) or {}).get("queue_depth") == len(queued), timeout=20, message="all queued"
            )
        doomed = queued_on(gw, "coalescer:0")
        assert doomed and queued_on(gw, "coalescer:1"), "flights of both shards wait at the Pacer"
        pids = supervisor(gw)["pids"]
        second = "coalescer:0" if first == "pacer:simulated" else "pacer:simulated"
        os.kill(pids[first], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: time.monotonic() >= killed_at + gap_s, interval=0.001, message="the gap")
        os.kill(pids[second], signal.SIGKILL)
        by = killed_at + CLIENT_DEADLINE_S
        outcomes = [c.end(by) for c in queued]
        lost = [c for c in queued if c.outcome == "error:coalescer_lost"]
        print(
            f"{len(queued)} queued, {doomed} of them at coalescer:0; outcomes {sorted(outcomes)}; "
            f"the lost ended {sorted(round(c.ended_at - killed_at, 2) for c in lost)} s after the first kill"
        )
        assert sorted(outcomes) == sorted(["error:coalescer_lost"] * doomed + ["done"] * (len(queued) - doomed))
        assert [c.end(by) for c in running] == ["done", "done"]  # their calls run on
        wait_until(lambda: holds_nothing(pacer_holds(gw)), timeout=15, message="the Pacer holding nothing")
        again = [Client(gw, c.text) for c in lost]
        assert [c.end(time.monotonic() + CLIENT_DEADLINE_S) for c in again] == ["done"] * len(lost)
        assert served_coalesced(gw) == ["done"] * 8
        wait_until(lambda: holds_nothing(pacer_holds(gw)), timeout=15, message="the Pacer holding nothing again")


def test_a_resume_relayed_from_a_worker_that_dies_ends_with_one_error_event():
    """A resumable stream of worker A, its client gone, resumed on worker B (relayed to A's
    socket, edge/worker_relay.py); A SIGKILLed mid-stream: B's client gets one terminal
    `worker_lost` event, as a Pool's death reaches its clients in-band. Failed before: the
    relayed body just ended, no terminal event (a clean end, like a whole answer), while a
    resume of it could only answer 404."""
    with running_gateway(ENV) as gw:
        text, body = relay.prompt("relayed kill", 1500, 20)  # 30 s: streaming when killed
        owner_connection, first = relay.start(gw, {**body, "resumable": True})
        request_id, owner = first.headers["x-request-id"], first.headers["x-sluice-worker"]
        last_id = [event_id for event_id, _ in first.take(5) if event_id is not None][-1]
        first.close()
        owner_connection.close()
        other = relay.other_worker(gw, owner)
        try:
            resumed = relay.resume_on(other, request_id, last_id)
            assert [event["type"] for _, event in resumed.take(3)] == ["delta"] * 3
            os.kill(worker_pids(gw)[owner], signal.SIGKILL)
            rest = [event for _, event in resumed.rest()]
            resumed.close()
        finally:
            other.close()
        ends = [e for e in rest if e["type"] in ("done", "error")]
        assert [e.get("code") for e in ends] == ["worker_lost"] and rest[-1] is ends[0], rest[-3:]
        wait_until(lambda: holds_nothing(pacer_holds(gw)), timeout=10, message="the Pacer holding nothing")
