"""Where does a request's time go between the client and its first delta? A traced run.

    .venv/bin/python -m bench.trace [--levels 1,20] [--streams 40] [--fine] [--json out.json]

Starts the sim and sluice, but sluice through `python -m bench.trace launch`, which
installs a tracer for the product's `protocols.trace.stamp()` points (no-ops in a normal
run) and then runs `run.main()`. The actor processes are forked from the launcher, so
the tracer is in every actor too. Every process appends
`time.time()`-stamped lines to $SLUICE_TRACE_DIR/<pid>.log; the driver joins them by
request id / stream id with the client's and the sim's own stamps and prints each
stage's p50/p95:

  client send → edge LocalStreams.join → bridge ask queued → ask runs on its thread
  → Coalescer receives Submit → Pacer receives LeaseRequest → Pacer sends OpenStream
  (its grant) → Pool receives it → Pool loop `_open` → sim receives the call
  → sim first byte → hub publishes the first delta → edge HubClient gets it
  → edge renders it → client receives it;   and: Admitted back at the edge → subscribe.

`--fine` adds points inside the edge's request handling and the Pool's upstream call
(bench/trace_fine.py: wrapped methods, no product code), printed as "(fine)" stages.

The tracer costs a little (a line of text per event); the figures are for attribution,
not for the headline numbers (bench.gateway gives those). Untraced, a stamp is a call
that tests one global: ~40 ns (timeit on the 2-core dev machine, Python 3.11), a few
dozen per request, against a Thespian hop of ~1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import os
import sys
import tempfile
import threading
import time
import uuid

TRACE_ENV = "SLUICE_TRACE_DIR"


# ======================================================================================
# the launcher side: a tracer for protocols.trace's stamps, then run.main()
# ======================================================================================
class _Writer:
    def __init__(self, directory: str):
        self.directory = directory
        self.pid = None
        self.f = None
        self.lock = threading.Lock()

    def __call__(self, *fields) -> None:
        line = "\t".join(str(x) for x in (time.time(), *fields)) + "\n"
        with self.lock:
            if self.pid != os.getpid():  # forked: a file of our own
                self.pid = os.getpid()
                self.f = open(os.path.join(self.directory, f"{self.pid}.log"), "a", buffering=1)
            self.f.write(line)


def _ids(msg) -> str:
    for name in ("request_id", "stream_id", "lease_id"):
        value = getattr(msg, name, None)
        if value:
            return f"{name}={value}"
    return "-"


class Tracer:
    """Turns `protocols.trace.stamp(point, role, subject, detail)` calls into the lines
    `read_traces` joins: (event, role, kind, ident), one file per process."""

    def __init__(self, directory: str):
        self.write = _Writer(directory)
        self.seen: set = set()  # (point, id, kind) stamped once per stream or request

    def _once(self, *key) -> bool:
        if key in self.seen:
            return False
        if len(self.seen) > 100_000:
            self.seen.clear()
        self.seen.add(key)
        return True

    def __call__(self, point: str, role: str, subject, detail) -> None:
        from protocols import messages as m

        if point in ("hub_publish", "hub_rx"):  # subject: stream id, detail: its events
            for e in detail or ():
                kind = e.get("type")
                if kind in ("started", "delta") and self._once(point, subject, kind):
                    self.write(point, role, kind, f"stream_id={subject}")
        elif point == "rendered":  # subject: request id, detail: the event
            if detail.get("type") == "delta" and self._once(point, subject):
                self.write("render_delta", role, "-", f"request_id={subject}")
        elif point == "edge_join":
            self.write(point, role, "-", f"request_id={subject}")
        elif point == "subscribe":
            self.write(point, role, "-", f"stream_id={subject}")
        else:  # subject: a message
            self.write(point, role, type(subject).__name__, _ids(subject))
            if point == "actor_send" and isinstance(subject, m.Admitted) and subject.role == "leader":
                # Stream ids are random: this line ties the leader's request to its stream.
                self.write("stream_of", role, subject.request_id, f"stream_id={subject.stream_id}")


def launch() -> int:
    directory = os.environ[TRACE_ENV]
    sys.path.insert(0, os.getcwd())
    from protocols import trace

    trace.install(Tracer(directory))
    if os.environ.get("SLUICE_TRACE_FINE"):
        from bench import trace_fine

        trace_fine.install()
    import run

    return run.main([])


# ======================================================================================
# the driver side
# ======================================================================================
STAGES = [
    ("client send → edge join", "client_send", "edge_join"),
    ("edge join → bridge ask called", "edge_join", "ask_call"),
    ("ask called → runs on a bridge thread", "ask_call", "ask_thread"),
    ("bridge thread → Coalescer gets Submit", "ask_thread", "co_submit"),
    ("Coalescer handles Submit → sends LeaseRequest", "co_submit", "co_lease_req"),
    ("LeaseRequest sent → Pacer gets it", "co_lease_req", "pacer_recv"),
    ("Pacer gets → sends OpenStream (grant)", "pacer_recv", "pacer_open"),
    ("OpenStream sent → Pool actor gets it", "pacer_open", "pool_recv"),
    ("(slice) Coalescer handles Submit → sends OpenStream", "co_submit", "co_open"),
    ("(slice) OpenStream sent by the shard → Pool actor gets it", "co_open", "pool_recv"),
    ("Pool actor → Pool loop _open", "pool_recv", "pool_open"),
    ("Pool loop _open → sim receives the call", "pool_open", "sim_started"),
    ("sim call → sim first byte (ttft knob)", "sim_started", "sim_first_byte"),
    ("sim first byte → hub publishes first delta", "sim_first_byte", "hub_delta"),
    ("hub publishes → edge HubClient gets it", "hub_delta", "edge_rx_delta"),
    ("edge gets → renders delta", "edge_rx_delta", "render_delta"),
    ("edge renders → client gets first delta", "render_delta", "client_delta"),
    ("(side) LeaseGranted sent → Coalescer gets it", "pacer_send", "co_granted"),
    ("(side) Coalescer sends Admitted → edge ask returns on the loop", "co_admitted", "ask_return"),
    ("(side) ask thread done → ask returns on the loop", "ask_thread_done", "ask_return"),
    ("(side) edge subscribes (after Admitted)", "ask_return", "subscribe"),
    ("(total) client send → sim receives the call", "client_send", "sim_started"),
    ("(total) sim first byte → client first delta", "sim_first_byte", "client_delta"),
    ("(total) client TTFT", "client_send", "client_delta"),
]


CANCEL_STAGES = [
    ("client closes → edge calls bridge.tell(Cancel)", "client_close", "tell_cancel"),
    ("tell called → runs on a bridge thread", "tell_cancel", "tell_thread"),
    ("bridge thread → Coalescer gets Cancel", "tell_thread", "co_cancel"),
    ("Coalescer gets Cancel → sends AbortStream", "co_cancel", "co_abort"),
    ("AbortStream sent → Pool actor gets it", "co_abort", "pool_recv_abort"),
    ("Pool actor → Pool loop _abort", "pool_recv_abort", "pool_abort"),
    ("Pool loop _abort → sim observes the cancel", "pool_abort", "sim_observed"),
    ("(total) client closes → sim observes", "client_close", "sim_observed"),
]


def read_traces(directory: str) -> list[tuple]:
    rows = []
    for path in glob.glob(os.path.join(directory, "*.log")):
        pid = int(os.path.basename(path).split(".")[0])
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 5:
                rows.append((float(parts[0]), pid, *parts[1:]))
    rows.sort()
    return rows


# (event, role prefix or None, message kinds or None) -> the timeline point it stamps;
# the first matching rule wins.
POINTS = [
    ("edge_join", None, None, "edge_join"),
    ("ask_call", None, ("Submit",), "ask_call"),
    ("ask_thread", None, ("Submit",), "ask_thread"),
    ("ask_thread_done", None, ("Submit",), "ask_thread_done"),
    ("ask_return", None, ("Submit",), "ask_return"),
    ("actor_recv", "coalescer", ("Submit",), "co_submit"),
    ("actor_send", "coalescer", ("LeaseRequest",), "co_lease_req"),
    ("actor_recv", "pacer", ("LeaseRequest",), "pacer_recv"),
    ("actor_send", "pacer", ("LeaseGranted", "LeaseQueued"), "pacer_send"),
    ("actor_recv", "coalescer", ("LeaseGranted", "LeaseQueued"), "co_granted"),
    ("actor_send", "coalescer", ("Admitted",), "co_admitted"),
    ("actor_send", "pacer", ("OpenStream",), "pacer_open"),
    ("actor_send", "coalescer", ("OpenStream",), "co_open"),  # from a lease slice
    ("actor_recv", "pool", ("OpenStream",), "pool_recv"),
    ("pool_open", None, None, "pool_open"),
    ("hub_publish", None, ("delta",), "hub_delta"),
    ("subscribe", None, None, "subscribe"),
    ("hub_rx", None, ("delta",), "edge_rx_delta"),
    ("render_delta", None, None, "render_delta"),
    ("tell_call", None, ("Cancel",), "tell_cancel"),
    ("tell_thread", None, ("Cancel",), "tell_thread"),
    ("tell_thread_done", None, ("Cancel",), "tell_thread_done"),
    ("actor_recv", "coalescer", ("Cancel",), "co_cancel"),
    ("actor_send", "coalescer", ("AbortStream",), "co_abort"),
    ("actor_recv", "pool", ("AbortStream",), "pool_recv_abort"),
    ("pool_abort", None, None, "pool_abort"),
]


def timelines(rows) -> dict[str, dict]:
    """request_id -> {point: time}, the first time each point was stamped. Leaders only
    (a stream is tied to its leader's request by the Coalescer's `stream_of` line)."""
    leader_of = {row[5].partition("=")[2]: row[4] for row in rows if row[2] == "stream_of"}
    out: dict[str, dict] = collections.defaultdict(dict)
    for row in rows:
        t, pid, event, role, kind, ident = row[:6]
        name, _, value = ident.partition("=")
        rid = value if name == "request_id" else (leader_of.get(value) if name in ("stream_id", "lease_id") else None)
        if rid is None:
            continue
        for rule_event, role_prefix, kinds, point in POINTS:
            if (
                event == rule_event
                and (role_prefix is None or role.startswith(role_prefix))
                and (kinds is None or kind in kinds)
            ):
                out[rid].setdefault(point, t)
                break
    return out


def main(argv=None) -> dict:
    if argv is None and sys.argv[1:2] == ["launch"]:
        sys.exit(launch())
    parser = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,20")
    parser.add_argument("--streams", type=int, default=40, help="streams per level")
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument(
        "--fine", action="store_true", help="finer points in the edge and the Pool (bench/trace_fine.py)"
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    stages = STAGES
    if args.fine:
        from bench import trace_fine

        POINTS[:0] = trace_fine.POINTS
        stages = STAGES + trace_fine.STAGES

    from bench.common import fmt, log, pct, sigterm_as_interrupt, write_json
    from bench.load import GatewayProc, Sim, new_pool, prompt_of, sim_prompt, sim_stats, stream_once

    knobs = {"ttft_ms": 200, "token_interval_ms": 20, "tokens": 10}
    trace_dir = tempfile.mkdtemp(prefix="sluice-trace-")
    sim, gw = Sim(), None
    result = {"levels": {}}
    with sigterm_as_interrupt():
        try:
            sim.start()
            env = {"SIMULATED_BASE_URL": sim.url, TRACE_ENV: trace_dir}
            if args.fine:
                env["SLUICE_TRACE_FINE"] = "1"
            gw = GatewayProc(env)
            gw.argv = [sys.executable, "-m", "bench.trace", "launch"]
            gw.start()
            for level in [int(x) for x in args.levels.split(",")]:
                clients = []

                async def drive(level: int, clients: list):
                    pool = new_pool(level + 2)
                    tag = uuid.uuid4().hex[:6]
                    per = max(1, args.streams // level)
                    period = 0.4

                    async def worker(j):
                        await asyncio.sleep(j * period / level)
                        for i in range(per):
                            clients.append(
                                await stream_once(
                                    pool, "sluice", gw.url + "/api/chat", sim_prompt(f"trace-{tag}-{j}-{i}", **knobs)
                                )
                            )

                    await asyncio.gather(*(worker(j) for j in range(level)))
                    await pool.aclose()

                asyncio.run(drive(level, clients))  # warm-up round, discarded
                clients.clear()
                asyncio.run(drive(level, clients))
                time.sleep(0.5)
                stats = sim_stats(sim.url)
                calls = {prompt_of(c.get("body")): c for c in stats["requests"]}
                rows = read_traces(trace_dir)
                lines = timelines(rows)
                # the request id of each client: from its meta event
                stage_values = collections.defaultdict(list)
                for res in clients:
                    rid = (res.meta or {}).get("request_id")
                    points = dict(lines.get(rid, {}))
                    call = calls.get(res.prompt)
                    if not rid or not call or res.first_delta_wall is None:
                        continue
                    points["client_send"] = res.sent_wall
                    points["client_delta"] = res.first_delta_wall
                    points["sim_started"] = call["started_at"]
                    points["sim_first_byte"] = call["first_byte_at"]
                    for name, a, b in stages:
                        if a in points and b in points:
                            stage_values[name].append((points[b] - points[a]) * 1000.0)
                table = []
                for name, _, _ in stages:
                    v = stage_values.get(name, [])
                    table.append({"stage": name, "n": len(v), "p50_ms": pct(v, 50), "p95_ms": pct(v, 95)})
                result["levels"][level] = table
                log(f"level {level}: {len(clients)} streams traced")
                for row in table:
                    print(
                        f"c={level:<3} {row['stage']:<62} n={row['n']:<4} p50 {fmt(row['p50_ms'], 2):>8}  p95 {fmt(row['p95_ms'], 2):>8}"
                    )
                for path in glob.glob(os.path.join(trace_dir, "*.log")):
                    open(path, "w").close()  # next level starts clean
            result["cancel"] = asyncio.run(trace_cancels(gw, sim, trace_dir, args.cancels))
        finally:
            if gw is not None:
                gw.stop()
            sim.stop()
    write_json(args.json, result) if args.json else None
    return result


async def trace_cancels(gw, sim, trace_dir: str, count: int) -> list[dict]:
    from bench.common import fmt, pct
    from bench.load import new_pool, prompt_of, sim_prompt, sim_stats, stream_once

    for path in glob.glob(os.path.join(trace_dir, "*.log")):
        open(path, "w").close()
    closes = []
    for _ in range(count):
        pool = new_pool(1)
        try:
            res = await stream_once(
                pool,
                "sluice",
                gw.url + "/api/chat",
                sim_prompt(f"trace-cancel-{uuid.uuid4().hex[:6]}", ttft_ms=200, token_interval_ms=20, tokens=500),
                hang_up_after_first_delta=0.0,
            )
        finally:
            await pool.aclose()
        closes.append(res)
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.5)
    stats = sim_stats(sim.url)
    calls = {prompt_of(c.get("body")): c for c in stats["requests"]}
    observed = {c["call_id"]: c["observed_at"] for c in stats["cancellations"]}
    lines = timelines(read_traces(trace_dir))
    values = collections.defaultdict(list)
    for res in closes:
        rid = (res.meta or {}).get("request_id")
        call = calls.get(res.prompt)
        if not rid or not call or res.closed_wall is None or call["call_id"] not in observed:
            continue
        points = dict(lines.get(rid, {}))
        points["client_close"] = res.closed_wall
        points["sim_observed"] = observed[call["call_id"]]
        for name, a, b in CANCEL_STAGES:
            if a in points and b in points:
                values[name].append((points[b] - points[a]) * 1000.0)
    table = []
    for name, _, _ in CANCEL_STAGES:
        v = values.get(name, [])
        table.append({"stage": name, "n": len(v), "p50_ms": pct(v, 50), "p95_ms": pct(v, 95)})
        print(f"cancel {name:<62} n={len(v):<4} p50 {fmt(pct(v, 50), 2):>8}  p95 {fmt(pct(v, 95), 2):>8}")
    return table


if __name__ == "__main__":
    main()
