"""What joining a cluster adds: TTFT at a member host vs at a single host, same machine.

    .venv/bin/python -m bench.scale_out [--requests 40] [--rounds 2] [--json out.json]

Three gateways over one simulated provider (its own process): a single host on
127.0.0.2 (today's sluice), and a two-host cluster — a leader on 127.0.0.3 and a member
on 127.0.0.4 (SLUICE_JOIN, docs/scale-out.md). Each round sends `--requests` distinct
requests one after the other (`#sim ttft_ms=50 tokens=4`) to the single host, to the
leader and to the member, and takes the client-observed TTFT (request sent -> first
delta). At the member every request crosses hosts twice before the upstream call (its
edge's Submit to the leader's shard, the Pacer's grant to the member's own Pool: the
Pacer prefers a Pool on the host the request arrived at, docs/scale-out.md "Pool
locality"), and its tokens stay on the member. Then a cross-host coalescing block: a slow call
(`ttft_ms=400`) started at the leader, and followers arriving 100 ms later at the leader
and at the member: their time to the first delta, from their own send.

`--hops N`: the cost of one Thespian hop between two hosts' actor systems, against one
within a host: bench/thespian_hop.py's Relay on a leader (127.0.0.5) bouncing N pings off
an Echo placed by capabilities on its own system, then on a member's (127.0.0.6, its own
process, joined with SLUICE_JOIN's machinery), signed frames both ways.

On one machine "another host" is another loopback address: the hop costs what a local
Thespian hop costs (bench/thespian_hop.py); between machines add the network's RTT per
hop. Numbers go to docs/benchmarks.md, "Several hosts".
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

from actors import placement
from bench.thespian_hop import Echo, Relay
from sim.testing import ROOT, Gateway, SSEClient, chat_body, free_port, running_sim, wait_until

SECRET = "bench-scale-out-secret-0123456789abcdef"
ENV = {
    "SLUICE_CLUSTER_SECRET": SECRET,
    "SLUICE_POOLS": "1",
    "SIMULATED_RPS": "1000",
    "SIMULATED_BURST": "1000",
    "SIMULATED_CONCURRENCY": "1000",
}


def first_delta(url: str, text: str) -> tuple[float, float]:
    """(sent, first delta) on the perf_counter clock; the stream is read to its end."""
    sent = time.perf_counter()
    client = SSEClient(url + "/api/chat", chat_body(text), timeout=30)
    try:
        while (event := client.next()) is not None:
            if event[0] == "message" and event[1].get("type") == "delta":
                return sent, time.perf_counter()
        raise RuntimeError(f"no delta: {client.events}")
    finally:
        client.read_all()
        client.close()


def ttft_ms(url: str, text: str) -> float:
    sent, at = first_delta(url, text)
    return (at - sent) * 1000


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def follower_block(leader: Gateway, member: Gateway, n: int) -> dict:
    """Followers of one slow call: at the leader's edge (same host as the flight's shard) and
    at the member's: their time to the first delta, minus the leader request's."""
    gaps: dict[str, list[float]] = {"same host": [], "other host": []}
    for _ in range(n):
        text = f"follow {uuid.uuid4().hex}\n#sim ttft_ms=400 tokens=4"
        firsts: dict[str, float] = {}

        def one(name: str, url: str, text: str, firsts: dict) -> None:
            firsts[name] = first_delta(url, text)[1]

        first = threading.Thread(target=one, args=("first", leader.url, text, firsts))
        first.start()
        time.sleep(0.1)  # the call is in flight: these two join it
        others = [
            threading.Thread(target=one, args=(k, u, text, firsts))
            for k, u in (("same host", leader.url), ("other host", member.url))
        ]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join()
        for name in gaps:
            gaps[name].append((firsts[name] - firsts["first"]) * 1000)
    return {name: {"p50": round(statistics.median(v), 1), "max": round(max(v), 1)} for name, v in gaps.items()}


class PlacedEcho(Echo):
    """bench/thespian_hop.py's Echo, created where its requirements name (actors/placement.py)."""

    actorSystemCapabilityCheck = staticmethod(placement.on_host)


def member_process(leader: str, port: int, secret: str):
    """A member actor system on 127.0.0.6, in a process of its own (one ActorSystem per
    process), up until its stdin closes."""
    import subprocess
    import sys

    code = (
        "import sys; from actors import system; "
        f"asys, group = system.start('127.0.0.6', {port}, {secret!r}.encode(), None, join={leader!r}); "
        "print('joined' if system.joined(asys, 15) else 'alone', flush=True); sys.stdin.read(); "
        "system.stop(asys, group)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "joined"
    return proc


def hop_block(messages: int) -> dict:
    from actors import system
    from bench import scale_out as named  # the class by its module's name, not __main__'s: the member imports it
    from protocols import auth

    secret = auth.new_secret().hex()
    port, member_port = free_port(), free_port()
    asys, group = system.start("127.0.0.5", port, secret.encode(), None)
    member = member_process(f"127.0.0.5:{port}", member_port, secret)
    try:
        relay = asys.createActor(Relay)
        out = {}
        for name, requirements in (
            ("within a host", None),
            ("between hosts", {placement.HOST: f"127.0.0.6:{member_port}"}),
        ):
            echo = asys.createActor(named.PlacedEcho, targetActorRequirements=requirements)
            asys.ask(relay, ("go", 50, echo), 60)  # warm: connections open
            started = time.perf_counter()
            asys.ask(relay, ("go", messages, echo), 300)
            out[name] = (time.perf_counter() - started) / (2 * messages) * 1000
        return out
    finally:
        assert member.stdin is not None
        member.stdin.close()
        member.wait(30)
        system.stop(asys, group)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hops", type=int, default=0, help="measure a Thespian hop between hosts instead")
    args = parser.parse_args()
    if args.hops:
        for _ in range(args.rounds):
            for name, ms in hop_block(args.hops).items():
                print(f"  one Thespian hop {name:<14} {ms:.3f} ms (signed frames, {args.hops} round trips)")
        return 0
    with running_sim() as sim:
        env = {**ENV, "SIMULATED_BASE_URL": sim}
        single = Gateway(env, "127.0.0.2").start()
        leader = Gateway(env, "127.0.0.3").start()
        member = Gateway({**env, "SLUICE_JOIN": f"127.0.0.3:{leader.actor_port}"}, "127.0.0.4")
        gateways = [single, leader, member]
        try:
            member.start(60)
            wait_until(lambda: ttft_ms(member.url, "warm\n#sim tokens=1") > 0, timeout=30, message="member serves")
            samples: dict[str, list[float]] = {
                "single host": [],
                "cluster, at the leader": [],
                "cluster, at a member": [],
            }
            for _ in range(args.rounds):
                for name, gw in zip(samples, gateways):
                    for i in range(args.requests):
                        samples[name].append(ttft_ms(gw.url, f"bench {uuid.uuid4().hex} {i}\n#sim ttft_ms=50 tokens=4"))
            print(f"client-observed TTFT, sim TTFT 50 ms, {args.requests} x {args.rounds} sequential requests each")
            for name, values in samples.items():
                print(f"  {name:<24} p50 {statistics.median(values):6.1f} ms   p95 {pct(values, 95):6.1f} ms")
            print("coalescing across hosts: a follower's first delta after the first client's (ms)")
            for name, figures in follower_block(leader, member, 10).items():
                print(f"  {name:<24} p50 {figures['p50']:6.1f} ms   max {figures['max']:6.1f} ms")
        finally:
            for gw in reversed(gateways):
                gw.stop()
            for gw in gateways:
                gw.kill_leftovers()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
