"""Coalescing and pacing under bursts, through the real gateway.

    .venv/bin/python -m bench.coalescing [--burst 1000] [--distinct 200] [--json out.json]

Part 1, identical burst: `--burst` identical concurrent requests to /api/chat (one HTTP/1.1
connection per stream, all opened at once), the sim's ttft raised to 2 s so every request
joins while the one upstream call is in flight. Measures: upstream calls (sim /stats),
completed streams, identical content, errors, and leader vs follower TTFT — both the
client-observed TTFT (each client's own send → first delta) and the fan-out lag (a
follower's first-delta arrival minus the leader's, wall clock), because a follower that
joined late has a short TTFT by construction. Target: follower TTFT p95 ≤ leader + 50 ms.

Part 2, production pacer: `--distinct` distinct concurrent requests with the sign-off
sheet's pacer (SIMULATED_RPS=1 SIMULATED_BURST=2 SIMULATED_CONCURRENCY=3), the queue
bound and max wait raised so that nothing is refused (PACER_MAX_QUEUE=1000,
PACER_MAX_WAIT_MS=400000), and a fast sim (ttft 50 ms, 3 tokens 10 ms apart) so the
run is paced by RPS alone: ~N seconds. Measures: errors (target 0) and queue wait
p50/p95/max from the meta events and from GET /api/metrics/performance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from bench.common import (
    fmt,
    loadavg,
    log,
    machine,
    pct,
    raise_nofile,
    sigterm_as_interrupt,
    system_cpu_busy,
    write_json,
)
from bench.load import GatewayProc, Sim, get_json, new_pool, prompt_of, sim_prompt, sim_stats, stream_once

BURST_KNOBS = {"ttft_ms": 2000, "token_interval_ms": 20, "tokens": 20}
PACED_KNOBS = {"ttft_ms": 50, "token_interval_ms": 10, "tokens": 3}
PACER_ENV = {
    "SIMULATED_RPS": "1",
    "SIMULATED_BURST": "2",
    "SIMULATED_CONCURRENCY": "3",
    "PACER_MAX_QUEUE": "1000",
    "PACER_MAX_WAIT_MS": "400000",
}
FOLLOWER_SLACK_MS = 50.0


def deltas_of(body: bytes) -> str:
    from protocols.sse import SSEParser

    out = []
    for item in SSEParser().feed(body):
        if item.event == "message" and item.data:
            data = json.loads(item.data)
            if data.get("type") == "delta":
                out.append(data["delta"])
    return "".join(out)


async def identical_burst(gw: GatewayProc, sim: Sim, n: int) -> dict:
    before = sim_stats(sim.url)["calls"]
    prompt = sim_prompt(f"burst-{uuid.uuid4().hex[:8]}", **BURST_KNOBS)
    pool = new_pool(n + 4)
    url = gw.url + "/api/chat"
    t0, c0, b0 = time.time(), time.process_time(), system_cpu_busy()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(stream_once(pool, "sluice", url, prompt, keep_body=True, timeout=60) for _ in range(n))),
            timeout=120,
        )
    finally:
        await pool.aclose()
    wall = time.time() - t0
    gen_cpu = (time.process_time() - c0) / wall * 100.0
    b1 = system_cpu_busy()
    await asyncio.sleep(0.5)
    stats = sim_stats(sim.url)
    calls = stats["calls"] - before
    call = next((c for c in stats["requests"] if prompt_of(c.get("body")) == prompt), None)
    contents = [deltas_of(r.body) for r in results if r.complete]
    distinct_contents = len(set(contents))
    roles = {}
    for r in results:
        role = (r.meta or {}).get("role", "none")
        roles[role] = roles.get(role, 0) + 1
    leaders = [r for r in results if (r.meta or {}).get("role") == "leader"]
    followers = [r for r in results if (r.meta or {}).get("role") == "follower"]
    leader = leaders[0] if leaders else None
    f_ttft = [r.ttft_ms for r in followers if r.ttft_ms is not None]
    lag = [(r.first_delta_wall - leader.first_delta_wall) * 1000.0 for r in followers if leader and r.first_delta_wall]
    sends = sorted(r.sent_wall for r in results)
    out = {
        "requests": n,
        "upstream_calls": calls,
        "completed": sum(1 for r in results if r.complete),
        "errors": sum(1 for r in results if not r.complete),
        "error_kinds": sorted({r.error for r in results if r.error}),
        "identical_content": distinct_contents == 1 and len(contents) == n,
        "distinct_contents": distinct_contents,
        "content_chars": len(contents[0]) if contents else 0,
        "roles": roles,
        "leader_ttft_ms": leader.ttft_ms if leader else None,
        "leader_gateway_ttft_ms": (leader.meta or {}).get("ttft_ms") if leader else None,
        "follower_ttft_p50_ms": pct(f_ttft, 50),
        "follower_ttft_p95_ms": pct(f_ttft, 95),
        "follower_ttft_max_ms": max(f_ttft) if f_ttft else None,
        "fanout_lag_p50_ms": pct(lag, 50),
        "fanout_lag_p95_ms": pct(lag, 95),
        "fanout_lag_max_ms": max(lag) if lag else None,
        "send_spread_ms": (sends[-1] - sends[0]) * 1000.0 if sends else None,
        "wall_s": wall,
        "generator_cpu_pct": gen_cpu,
        "machine_busy_pct": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * 100.0,
    }
    if call and leader and leader.first_delta_wall:
        # where the leader's time went, on the sim's clock (time.time() on both sides)
        out["leader_split_ms"] = {
            "client_send_to_sim_call": (call["started_at"] - leader.sent_wall) * 1000.0,
            "sim_call_to_first_byte": (call["first_byte_at"] - call["started_at"]) * 1000.0,
            "sim_first_byte_to_client_delta": (leader.first_delta_wall - call["first_byte_at"]) * 1000.0,
            "last_send_to_sim_call": (call["started_at"] - sends[-1]) * 1000.0,
        }
    return out


async def paced_distinct(gw: GatewayProc, sim: Sim, n: int) -> dict:
    before = sim_stats(sim.url)["calls"]
    pool = new_pool(n + 4)
    url = gw.url + "/api/chat"
    tag = uuid.uuid4().hex[:8]
    t0 = time.time()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    stream_once(pool, "sluice", url, sim_prompt(f"paced-{tag}-{i}", **PACED_KNOBS), timeout=600)
                    for i in range(n)
                )
            ),
            timeout=n * 1.0 * 2 + 120,
        )
    finally:
        await pool.aclose()
    wall = time.time() - t0
    await asyncio.sleep(0.5)
    calls = sim_stats(sim.url)["calls"] - before
    waits = [r.meta.get("queue_wait_ms") for r in results if r.meta and r.meta.get("queue_wait_ms") is not None]
    status, perf = get_json(gw.url + f"/api/metrics/performance?last_n={n}")
    qw = (perf or {}).get("queue_wait_ms")
    return {
        "requests": n,
        "upstream_calls": calls,
        "completed": sum(1 for r in results if r.complete),
        "errors": sum(1 for r in results if not r.complete),
        "error_kinds": sorted({r.error for r in results if r.error}),
        "statuses": sorted({r.status for r in results if r.status}),
        "queue_wait_meta": {
            "n": len(waits),
            "p50_ms": pct(waits, 50),
            "p95_ms": pct(waits, 95),
            "max_ms": max(waits) if waits else None,
        },
        "queue_wait_metrics_endpoint": qw,
        "performance": perf,
        "ttft_p50_ms": pct([r.ttft_ms for r in results], 50),
        "wall_s": wall,
        "effective_rps": calls / wall if wall else None,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.coalescing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    nofile = raise_nofile(args.burst * 2 + 256)
    results = {
        "machine": machine(),
        "params": vars(args),
        "burst_knobs": BURST_KNOBS,
        "paced_knobs": PACED_KNOBS,
        "pacer_env": PACER_ENV,
    }
    results["nofile"] = nofile
    sim = Sim()
    gw = None
    with sigterm_as_interrupt():
        try:
            sim.start()
            if args.burst:
                gw = GatewayProc({"SIMULATED_BASE_URL": sim.url}).start()
                log(f"burst of {args.burst} identical requests")
                results["burst"] = asyncio.run(identical_burst(gw, sim, args.burst))
                b = results["burst"]
                log(
                    f"burst: {b['upstream_calls']} upstream call(s), {b['completed']}/{b['requests']} completed, identical={b['identical_content']}, "
                    f"leader TTFT {fmt(b['leader_ttft_ms'])} ms, follower p95 {fmt(b['follower_ttft_p95_ms'])} ms, lag p95 {fmt(b['fanout_lag_p95_ms'])} ms"
                )
                gw.stop()
                gw = None
            if args.distinct:
                gw = GatewayProc({"SIMULATED_BASE_URL": sim.url, **PACER_ENV}).start()
                log(f"{args.distinct} distinct requests at the production pacer (~{args.distinct} s)")
                results["paced"] = asyncio.run(paced_distinct(gw, sim, args.distinct))
                p = results["paced"]
                log(
                    f"paced: errors {p['errors']}, queue wait meta p50 {fmt(p['queue_wait_meta']['p50_ms'], 0)} p95 {fmt(p['queue_wait_meta']['p95_ms'], 0)} "
                    f"max {fmt(p['queue_wait_meta']['max_ms'], 0)} ms, {p['effective_rps']:.2f} calls/s"
                )
        finally:
            if gw is not None:
                gw.stop()
            sim.stop()
    results["verdicts"] = verdicts(results)
    results["loadavg_at_end"] = loadavg()
    write_json(args.json, results)
    print(render_markdown(results))
    return results


def verdicts(r: dict) -> list[dict]:
    out = []
    b = r.get("burst")
    if b:
        out.append(
            {
                "measure": f"identical burst of {b['requests']}: upstream calls",
                "value": b["upstream_calls"],
                "target": "1",
                "verdict": "PASS" if b["upstream_calls"] == 1 else "MISS",
            }
        )
        out.append(
            {
                "measure": "identical burst: errors",
                "value": b["errors"],
                "target": "0",
                "verdict": "PASS" if b["errors"] == 0 else "MISS",
            }
        )
        out.append(
            {
                "measure": "identical burst: identical content",
                "value": b["identical_content"],
                "target": "True",
                "verdict": "PASS" if b["identical_content"] else "MISS",
            }
        )
        limit = (b["leader_ttft_ms"] or 0) + FOLLOWER_SLACK_MS
        out.append(
            {
                "measure": "follower TTFT p95 vs leader + 50 ms",
                "value": b["follower_ttft_p95_ms"],
                "target": f"≤ {limit:.1f} ms",
                "verdict": "PASS"
                if b["follower_ttft_p95_ms"] is not None and b["follower_ttft_p95_ms"] <= limit
                else "MISS",
            }
        )
    p = r.get("paced")
    if p:
        out.append(
            {
                "measure": f"{p['requests']} distinct at RPS=1 BURST=2 CONCURRENCY=3: errors",
                "value": p["errors"],
                "target": "0",
                "verdict": "PASS" if p["errors"] == 0 else "MISS",
            }
        )
    return out


def render_markdown(r: dict) -> str:
    lines = ["| measure | value | target | verdict |", "|---|---:|---:|---|"]
    for v in r["verdicts"]:
        value = fmt(v["value"]) if isinstance(v["value"], float) else v["value"]
        lines.append(f"| {v['measure']} | {value} | {v['target']} | {v['verdict']} |")
    b = r.get("burst")
    if b:
        lines += [
            "",
            f"Identical burst: {b['requests']} requests sent over {fmt(b['send_spread_ms'], 0)} ms, roles {b['roles']}, "
            f"{b['upstream_calls']} upstream call(s), {b['completed']} completed, {b['errors']} errors, "
            f"{b['distinct_contents']} distinct content(s) of {b['content_chars']} chars, wall {b['wall_s']:.1f} s; "
            f"load generator {fmt(b.get('generator_cpu_pct'), 0)} % of a core, machine {fmt(b.get('machine_busy_pct'), 0)} % busy over the burst.",
            "",
            "| | p50 ms | p95 ms | max ms |",
            "|---|---:|---:|---:|",
            f"| leader TTFT (client) | {fmt(b['leader_ttft_ms'])} | | |",
            f"| follower TTFT (client) | {fmt(b['follower_ttft_p50_ms'])} | {fmt(b['follower_ttft_p95_ms'])} | {fmt(b['follower_ttft_max_ms'])} |",
            f"| follower first delta − leader first delta | {fmt(b['fanout_lag_p50_ms'])} | {fmt(b['fanout_lag_p95_ms'])} | {fmt(b['fanout_lag_max_ms'])} |",
        ]
        split = b.get("leader_split_ms")
        if split:
            lines += [
                "",
                f"Leader's time (wall clocks of client and sim): client send → sim receives the call {fmt(split['client_send_to_sim_call'])} ms "
                f"(after the last of the {b['requests']} sends: {fmt(split['last_send_to_sim_call'])} ms); sim call → first byte "
                f"{fmt(split['sim_call_to_first_byte'])} ms; sim first byte → leader's first delta {fmt(split['sim_first_byte_to_client_delta'])} ms; "
                f"gateway-measured TTFT in the meta event {fmt(b['leader_gateway_ttft_ms'])} ms.",
            ]
    p = r.get("paced")
    if p:
        qm, qe = p["queue_wait_meta"], p["queue_wait_metrics_endpoint"] or {}
        lines += [
            "",
            f"Production pacer: {p['requests']} distinct requests, {p['completed']} completed, {p['errors']} errors "
            f"(statuses {p['statuses']}), {p['upstream_calls']} upstream calls in {p['wall_s']:.0f} s ({p['effective_rps']:.2f}/s).",
            "",
            "| queue wait | p50 ms | p95 ms | max ms |",
            "|---|---:|---:|---:|",
            f"| from meta events (n={qm['n']}) | {fmt(qm['p50_ms'], 0)} | {fmt(qm['p95_ms'], 0)} | {fmt(qm['max_ms'], 0)} |",
            f"| GET /api/metrics/performance | {fmt(qe.get('p50'), 0)} | {fmt(qe.get('p95'), 0)} | {fmt(qe.get('max'), 0)} (p99 {fmt(qe.get('p99'), 0)}) |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
