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
from tests.support import SSEClient, chat_body, data_events, request, running_gateway, wait_until

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
        self.outcome: str | None = None
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
