"""What one Thespian hop costs, per variant of the transport:

    epoll   Thespian's own selector, plain pickle frames
    poll    patches/thespian_selector.py's PollSelector, plain pickle frames
    signed  poll, and every frame signed and checked with the cluster secret
            (patches/thespian_transport.py: HMAC-SHA256 before pickle.loads), and every other
            patch of `patches.install_thespian` — production
    fiveturns   signed without patches/thespian_turns.py (Thespian's five select turns a message)

    .venv/bin/python -m bench.thespian_hop [--messages 2000] [--rounds 2] [--variants poll,signed]

Two actors on multiprocTCPBase bounce `--messages` round trips (2 × messages hops); the
wall time per hop and the CPU both actors spent per message (os.times in each, before and
after). Each variant runs in a child process of its own, alternating, because the
selector and the serializer are process-wide and inherited by the forked actors. With
both poll and fiveturns, a line gives the cost of authentication (fiveturns / poll); with
both fiveturns and signed, the gain of patches/thespian_turns.py (signed / fiveturns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from thespian.actors import Actor

from bench.common import ROOT, free_port, log


class Echo(Actor):
    def receiveMessage(self, msg, sender):
        if isinstance(msg, tuple) and msg[0] == "ping":
            self.send(msg[1], "pong")
        elif msg == "hi":  # a Peer: one more idle connection in this actor's transport
            self.peers = getattr(self, "peers", 0) + 1
        elif msg == "peers":
            self.send(sender, getattr(self, "peers", 0))
        elif msg == "cpu":
            t = os.times()
            self.send(sender, t.user + t.system)


class Relay(Actor):
    """Bounces `n` pings off Echo, one at a time; answers with its CPU seconds at the end."""

    def receiveMessage(self, msg, sender):
        if isinstance(msg, tuple) and msg[0] == "go":
            self.left, self.echo, self.asker = msg[1], msg[2], sender
            self.send(self.echo, ("ping", self.myAddress))
        elif msg == "pong":
            self.left -= 1
            if self.left:
                self.send(self.echo, ("ping", self.myAddress))
            else:
                t = os.times()
                self.send(self.asker, t.user + t.system)
        elif msg == "hi":
            self.peers = getattr(self, "peers", 0) + 1
        elif msg == "peers":
            self.send(sender, getattr(self, "peers", 0))
        elif msg == "cpu":
            t = os.times()
            self.send(sender, t.user + t.system)


class Peer(Actor):
    """Says hi to each actor it is given: one more connection each of them keeps open and
    looks at on every turn of its transport loop, as a Coalescer does for every edge
    bridge thread and every Pool."""

    def receiveMessage(self, msg, sender):
        if isinstance(msg, tuple) and msg[0] == "greet":
            for each in msg[1:]:
                self.send(each, "hi")


VARIANTS = ("epoll", "poll", "signed", "fiveturns")


def child(variant: str, messages: int, idle: int = 0) -> dict:
    from actors import system
    from patches import thespian_bind, thespian_selector
    from protocols import auth

    if variant in ("signed", "fiveturns"):
        system.prepare("127.0.0.1", auth.new_secret())  # all of patches.install_thespian
        if variant == "fiveturns":
            from patches import thespian_turns

            thespian_turns.uninstall()
    else:
        thespian_bind.install("127.0.0.1")  # unsigned frames: the baseline
        if variant == "poll":
            thespian_selector.install()  # "epoll" keeps Thespian's own selector
    from thespian.actors import ActorSystem

    asys = ActorSystem("multiprocTCPBase", capabilities={"Admin Port": free_port()}, logDefs=None)
    try:
        echo, relay = asys.createActor(Echo), asys.createActor(Relay)
        for _ in range(idle):
            asys.tell(asys.createActor(Peer), ("greet", echo, relay))
        deadline = time.monotonic() + 60
        while min(asys.ask(echo, "peers", 10), asys.ask(relay, "peers", 10)) < idle:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {idle} peers did not all say hi within 60 s")
            time.sleep(0.05)
        cpu_echo, cpu_relay = asys.ask(echo, "cpu", 10), asys.ask(relay, "cpu", 10)
        t0 = time.perf_counter()
        cpu_relay_end = asys.ask(relay, ("go", messages, echo), 300)
        wall = time.perf_counter() - t0
        cpu_echo_end = asys.ask(echo, "cpu", 10)
        hops = 2 * messages
        cpu = (cpu_relay_end - cpu_relay) + (cpu_echo_end - cpu_echo)
        return {
            "variant": variant,
            "idle": idle,
            "hops": hops,
            "ms_per_hop": wall / hops * 1e3,
            "cpu_ms_per_message": cpu / hops * 1e3,
        }
    finally:
        asys.shutdown()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.thespian_hop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--idle", type=int, default=0, help="idle connections each of the two actors keeps (from as many peers)"
    )
    parser.add_argument("--variants", default="poll,signed", help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.messages, args.idle)))
        return []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    rows = []
    for rnd in range(args.rounds):
        for variant in variants:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.thespian_hop",
                    "--child",
                    variant,
                    "--messages",
                    str(args.messages),
                    "--idle",
                    str(args.idle),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(
                f"round {rnd + 1} {variant:9s}: {row['ms_per_hop']:.3f} ms per hop, "
                f"{row['cpu_ms_per_message']:.3f} CPU ms per message (both ends)"
            )
    if "poll" in variants and "fiveturns" in variants:
        log(ratio(rows, "fiveturns", "poll"))
    if "fiveturns" in variants and "signed" in variants:
        log(ratio(rows, "signed", "fiveturns"))
    return rows


def ratio(rows: list[dict], variant: str, base: str) -> str:
    """Median over rounds of variant / base, for the wall time per hop and the CPU per message."""
    import statistics

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["variant"] == name)

    hop = median(variant, "ms_per_hop") / median(base, "ms_per_hop")
    cpu = median(variant, "cpu_ms_per_message") / median(base, "cpu_ms_per_message")
    return f"{variant} / {base} (medians): {hop:.3f}× per hop, {cpu:.3f}× CPU per message"


if __name__ == "__main__":
    main()
