"""Gateway overhead: what does going through sluice add, against the simulated provider
called directly, under the same load, in the same run?

    .venv/bin/python -m bench.gateway [--rounds 4] [--json out.json]

One simulated provider (sim.provider.start_subprocess) serves both targets; sluice
(`run.py`, sim.testing.Gateway) points at it with SIMULATED_BASE_URL. The load
generator is this process: asyncio + httpcore, HTTP/1.1 to both targets (uvicorn is
HTTP/1.1; sluice speaks h2c to the sim). Every request has a distinct prompt (nothing
coalesces), `#sim ttft_ms=200 token_interval_ms=20 tokens=10`.

Measures
  * added TTFT: client-observed time to the first delta byte, sluice − direct, p50/p95,
    at 1, 10 and 20 concurrent streams (closed loop, workers staggered over one stream's
    duration so the concurrency is steady). Blocks alternate direct/sluice in ABBA order;
    the figure is the median over block pairs of (sluice pXX − direct pXX), with the
    pooled figure and the spread alongside. The sim's own stamps split the added time
    into "in" (client send → sim receives the call) and "out" (sim's first byte → client
    gets the first delta).
  * cancel: the client hangs up right after the first delta; the sim's /stats
    cancellation `observed_at` minus the client's close time (both wall clock), sluice
    and direct interleaved, 30 each by default.
  * idle RSS: sum of VmRSS over run.py's whole process tree (Thespian's admin is in a
    session of its own; actors.system.descendants finds it), fresh and after the load;
    PSS alongside (shared pages counted once).
  * ready: `run.py` start → /readyz 200, median of 5 (sim given by URL, and with the
    built-in sim that a fresh `python run.py` starts itself).
The generator's own CPU is recorded per block, so it can be seen not to be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from bench.common import (
    cmdline,
    cpu_seconds,
    fmt,
    loadavg,
    log,
    machine,
    median,
    pct,
    pss_kib,
    rss_kib,
    sigterm_as_interrupt,
    spread,
    system_cpu_busy,
    tree_cpu,
    wait_for_quiet,
    write_json,
)
from bench.load import GatewayProc, Sim, get_json, new_pool, prompt_of, sim_prompt, sim_stats, stream_once

QUIET_PCT = 50.0  # wait (bounded) for the machine to be below this % busy before each pair
QUIET_WAIT_S = 20.0
KNOBS = {"ttft_ms": 200, "token_interval_ms": 20, "tokens": 10}
TARGETS = {
    "added_ttft_p50_ms_at_20": 10.0,
    "added_ttft_p95_ms_at_20": 25.0,
    "cancel_p95_ms": 20.0,
    "idle_rss_mb": 200.0,
    "ready_s": 2.0,
}


def url_of(target: str, sim: Sim, gw: GatewayProc) -> str:
    return sim.url + "/v1/chat/completions" if target == "direct" else gw.url + "/api/chat"


async def run_block(target: str, url: str, concurrency: int, per_worker: int, knobs: dict, watch_pids=()) -> dict:
    """`concurrency` workers, each `per_worker` streams back to back, staggered."""
    period_s = (knobs["ttft_ms"] + knobs["tokens"] * knobs["token_interval_ms"]) / 1000.0
    pool = new_pool(concurrency + 2)
    results = []
    tag = uuid.uuid4().hex[:8]

    async def worker(j: int):
        await asyncio.sleep(j * period_s / concurrency)
        for i in range(per_worker):
            results.append(await stream_once(pool, target, url, sim_prompt(f"{tag}-{j}-{i}", **knobs)))

    cpu0, wall0, sys0, tree0 = time.process_time(), time.monotonic(), system_cpu_busy(), tree_cpu(watch_pids)
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(j) for j in range(concurrency))), timeout=120)
    finally:
        await pool.aclose()
    cpu1, wall1, sys1, tree1 = time.process_time(), time.monotonic(), system_cpu_busy(), tree_cpu(watch_pids)
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None]
    return {
        "target": target,
        "concurrency": concurrency,
        "n": len(results),
        "errors": sum(1 for r in results if not r.complete),
        "error_kinds": sorted({r.error for r in results if r.error}),
        "p50_ms": pct(ttfts, 50),
        "p95_ms": pct(ttfts, 95),
        "max_ms": max(ttfts) if ttfts else None,
        "generator_cpu_pct": (cpu1 - cpu0) / (wall1 - wall0) * 100.0,
        "machine_busy_pct": (sys1[0] - sys0[0]) / max(1, sys1[1] - sys0[1]) * 100.0,
        "wall_s": wall1 - wall0,
        "server_cpu_ms_per_stream": (tree1 - tree0) / max(1, len(results)) * 1000.0 if watch_pids else None,
        "results": results,
    }


def split_with_sim(block: dict, stats: dict) -> None:
    """Attach the sim's stamps: in = sim started_at − sent, out = first delta − sim first byte."""
    by_prompt = {prompt_of(r.get("body")): r for r in stats.get("requests", [])}
    ins, outs, gw_ttft = [], [], []
    for res in block["results"]:
        call = by_prompt.get(res.prompt)
        if call and call.get("started_at") and call.get("first_byte_at") and res.first_delta_wall:
            ins.append((call["started_at"] - res.sent_wall) * 1000.0)
            outs.append((res.first_delta_wall - call["first_byte_at"]) * 1000.0)
        if res.meta and res.meta.get("ttft_ms") is not None:
            gw_ttft.append(res.meta["ttft_ms"])
    block["in_p50_ms"], block["in_p95_ms"] = pct(ins, 50), pct(ins, 95)
    block["out_p50_ms"], block["out_p95_ms"] = pct(outs, 50), pct(outs, 95)
    block["matched_with_sim"] = len(ins)
    block["gateway_meta_ttft_p50_ms"] = pct(gw_ttft, 50)


async def ttft_bench(sim: Sim, gw: GatewayProc, levels, rounds: int, knobs: dict) -> dict:
    out = {"blocks": [], "levels": {}}
    per_worker = {1: 8, 10: 3, 20: 3}
    # warm-up: connections, imports, JIT-less caches; discarded
    for target in ("direct", "sluice"):
        await run_block(target, url_of(target, sim, gw), 20, 1, knobs)
    for c in levels:
        pw = per_worker.get(c, 3)
        blocks = []
        for rnd in range(rounds):
            order = ("direct", "sluice") if rnd % 2 == 0 else ("sluice", "direct")  # ABBA...
            quiet = wait_for_quiet(QUIET_PCT, QUIET_WAIT_S) if QUIET_PCT else None
            pair = {}
            for target in order:
                watch = gw.pids() if target == "sluice" else {sim.proc.pid}
                block = await run_block(target, url_of(target, sim, gw), c, pw, knobs, watch)
                split_with_sim(block, sim_stats(sim.url))
                block["round"] = rnd
                block["quiet_before"] = quiet
                pair[target] = block
                blocks.append(block)
                log(
                    f"c={c:<3} round {rnd} {target:<6} n={block['n']} p50 {fmt(block['p50_ms'])} p95 {fmt(block['p95_ms'])} ms "
                    f"in {fmt(block['in_p50_ms'], 2)} out {fmt(block['out_p50_ms'], 2)} errors {block['errors']} "
                    f"gen CPU {block['generator_cpu_pct']:.0f}% machine {block['machine_busy_pct']:.0f}%"
                )
        out["levels"][c] = summarize_level(blocks)
        for b in blocks:
            b.pop("results")
        out["blocks"] += blocks
    return out


def summarize_level(blocks: list[dict]) -> dict:
    rounds = sorted({b["round"] for b in blocks})
    get = lambda t, r: next(b for b in blocks if b["target"] == t and b["round"] == r)  # noqa: E731
    d50 = [get("sluice", r)["p50_ms"] - get("direct", r)["p50_ms"] for r in rounds]
    d95 = [get("sluice", r)["p95_ms"] - get("direct", r)["p95_ms"] for r in rounds]
    pooled = {
        t: [x.ttft_ms for b in blocks if b["target"] == t for x in b["results"] if x.ttft_ms is not None]
        for t in ("direct", "sluice")
    }
    row = {
        "added_p50_ms": median(d50),
        "added_p95_ms": median(d95),
        "added_p50_spread": spread(d50),
        "added_p95_spread": spread(d95),
        "pooled_added_p50_ms": pct(pooled["sluice"], 50) - pct(pooled["direct"], 50),
        "pooled_added_p95_ms": pct(pooled["sluice"], 95) - pct(pooled["direct"], 95),
        "errors": {t: sum(b["errors"] for b in blocks if b["target"] == t) for t in ("direct", "sluice")},
        "samples": {t: len(pooled[t]) for t in pooled},
        "generator_cpu_pct_max": max(b["generator_cpu_pct"] for b in blocks),
        "machine_busy_pct_median": median(b["machine_busy_pct"] for b in blocks),
        "server_cpu_ms_per_stream": {
            t: median(b["server_cpu_ms_per_stream"] for b in blocks if b["target"] == t) for t in ("direct", "sluice")
        },
        "quiet_before": [b["quiet_before"] for b in blocks if b["target"] == "direct"],
    }
    for t in ("direct", "sluice"):
        row[f"{t}_p50_ms"] = pct(pooled[t], 50)
        row[f"{t}_p95_ms"] = pct(pooled[t], 95)
        row[f"{t}_in_p50_ms"] = median(b["in_p50_ms"] for b in blocks if b["target"] == t)
        row[f"{t}_out_p50_ms"] = median(b["out_p50_ms"] for b in blocks if b["target"] == t)
        row[f"{t}_in_p95_ms"] = median(b["in_p95_ms"] for b in blocks if b["target"] == t)
        row[f"{t}_out_p95_ms"] = median(b["out_p95_ms"] for b in blocks if b["target"] == t)
    row["sluice_meta_ttft_p50_ms"] = median(b["gateway_meta_ttft_p50_ms"] for b in blocks if b["target"] == "sluice")
    return row


async def cancel_bench(sim: Sim, gw: GatewayProc, count: int) -> dict:
    """Hang up after the first delta; when does the sim see its call end?"""
    knobs = {"ttft_ms": 200, "token_interval_ms": 20, "tokens": 500}  # 10 s of tokens: never ends by itself
    samples = {"direct": [], "sluice": []}
    missed = {"direct": 0, "sluice": 0}
    for i in range(count):
        for target in ("direct", "sluice") if i % 2 == 0 else ("sluice", "direct"):
            prompt = sim_prompt(f"cancel-{uuid.uuid4().hex[:8]}", **knobs)
            pool = new_pool(1)
            try:
                res = await stream_once(pool, target, url_of(target, sim, gw), prompt, hang_up_after_first_delta=0.0)
            finally:
                await pool.aclose()  # the socket is closed here at the latest
            if res.closed_wall is None:
                missed[target] += 1
                log(f"cancel {target}: no delta before hang-up ({res.error}, status {res.status})")
                continue
            observed = None
            deadline = time.monotonic() + 3.0
            while observed is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                stats = sim_stats(sim.url)
                ids = {r["call_id"] for r in stats["requests"] if prompt_of(r.get("body")) == prompt}
                observed = next((c["observed_at"] for c in stats["cancellations"] if c["call_id"] in ids), None)
            if observed is None:
                missed[target] += 1
                log(f"cancel {target}: the sim saw no cancellation within 3 s")
                continue
            samples[target].append((observed - res.closed_wall) * 1000.0)
    perf = None
    try:
        status, perf = get_json(gw.url + "/api/metrics/performance?last_n=1000")
    except Exception as exc:  # the figure is informative only
        log("performance query failed:", exc)
    out = {"count": count}
    for t in samples:
        out[t] = {
            "n": len(samples[t]),
            "missed": missed[t],
            "p50_ms": pct(samples[t], 50),
            "p95_ms": pct(samples[t], 95),
            "max_ms": max(samples[t]) if samples[t] else None,
            "samples_ms": [round(x, 3) for x in samples[t]],
        }
    out["sluice_reported_cancel_ms"] = (perf or {}).get("cancel_ms")
    return out


def tree_memory(gw: GatewayProc) -> dict:
    from bench.profile import roles_of

    try:
        roles = roles_of(gw)
    except Exception as exc:  # the roles only label the table
        log("could not name the processes:", exc)
        roles = {}
    procs = []
    for pid in sorted(gw.pids()):
        procs.append(
            {
                "pid": pid,
                "role": roles.get(pid, "?"),
                "rss_kib": rss_kib(pid),
                "pss_kib": pss_kib(pid),
                "cmd": cmdline(pid)[:120],
            }
        )
    return {
        "processes": procs,
        "count": len(procs),
        "rss_mb": sum(p["rss_kib"] or 0 for p in procs) / 1024.0,
        "pss_mb": sum(p["pss_kib"] or 0 for p in procs) / 1024.0
        if all(p["pss_kib"] is not None for p in procs)
        else None,
    }


def idle_cpu(gw: GatewayProc, seconds: float) -> dict:
    """CPU the idle gateway burns (timers, directory refresh, watchdogs), over `seconds`."""
    pids = gw.pids()
    c0, t0 = {p: cpu_seconds(p) or 0.0 for p in pids}, time.monotonic()
    time.sleep(seconds)
    c1, t1 = {p: cpu_seconds(p) or 0.0 for p in pids}, time.monotonic()
    per = {str(p): round((c1[p] - c0[p]) / (t1 - t0) * 100.0, 2) for p in pids}
    return {
        "seconds": t1 - t0,
        "pct_of_core": sum((c1[p] - c0[p]) for p in pids) / (t1 - t0) * 100.0,
        "per_pid_pct": per,
    }


def ready_bench(sim: Sim, starts: int) -> dict:
    out = {}
    for label, env in (("sim_by_url", {"SIMULATED_BASE_URL": sim.url}), ("builtin_sim", {})):
        times = []
        for _ in range(starts):
            g = GatewayProc(env)
            try:
                g.start()
                times.append(g.ready_s)
            finally:
                g.stop()
        out[label] = {"median_s": median(times), "spread": spread(times), "samples_s": [round(t, 3) for t in times]}
        log(f"ready ({label}): median {median(times):.3f} s  {[round(t, 3) for t in times]}")
    return out


def main(argv=None) -> dict:
    global QUIET_PCT
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,10,20")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per target per concurrency level")
    parser.add_argument("--cancels", type=int, default=30)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument(
        "--quiet-pct",
        type=float,
        default=50.0,
        help="wait for the machine below this %% busy before each pair (0 = never)",
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    QUIET_PCT = args.quiet_pct
    levels = [int(x) for x in args.levels.split(",") if x]
    results = {"machine": machine(), "params": vars(args), "knobs": KNOBS, "targets": TARGETS}
    sim = Sim()
    gw = None
    with sigterm_as_interrupt():
        try:
            sim.start()
            log(f"sim on {sim.url}")
            gw = GatewayProc({"SIMULATED_BASE_URL": sim.url}).start()
            log(f"sluice on {gw.url}, ready in {gw.ready_s:.3f} s, {len(gw.pids())} processes")
            time.sleep(2.0)
            results["idle_fresh"] = tree_memory(gw)
            results["idle_cpu"] = idle_cpu(gw, 10.0)
            log(f"idle CPU of the sluice tree: {results['idle_cpu']['pct_of_core']:.1f} % of a core")
            log(
                f"idle RSS fresh: {results['idle_fresh']['rss_mb']:.1f} MB (PSS {fmt(results['idle_fresh']['pss_mb'])} MB)"
            )
            results["ttft"] = asyncio.run(ttft_bench(sim, gw, levels, args.rounds, KNOBS))
            results["cancel"] = asyncio.run(cancel_bench(sim, gw, args.cancels))
            log(
                f"cancel sluice p50 {fmt(results['cancel']['sluice']['p50_ms'])} p95 {fmt(results['cancel']['sluice']['p95_ms'])} ms; "
                f"direct p95 {fmt(results['cancel']['direct']['p95_ms'])}"
            )
            time.sleep(3.0)
            results["idle_after_load"] = tree_memory(gw)
            log(f"idle RSS after load: {results['idle_after_load']['rss_mb']:.1f} MB")
            gw.stop()
            gw = None
            results["ready"] = ready_bench(sim, args.starts)
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
    lvl = r["ttft"]["levels"].get(20) or r["ttft"]["levels"].get("20") or {}
    rows = [
        ("added TTFT p50 at 20 concurrent", lvl.get("added_p50_ms"), TARGETS["added_ttft_p50_ms_at_20"], "ms"),
        ("added TTFT p95 at 20 concurrent", lvl.get("added_p95_ms"), TARGETS["added_ttft_p95_ms_at_20"], "ms"),
        ("cancel → upstream abort p95", r["cancel"]["sluice"]["p95_ms"], TARGETS["cancel_p95_ms"], "ms"),
        ("idle RSS, all sluice processes", r["idle_after_load"]["rss_mb"], TARGETS["idle_rss_mb"], "MB"),
        ("start → /readyz 200 (median of starts)", r["ready"]["sim_by_url"]["median_s"], TARGETS["ready_s"], "s"),
    ]
    out = []
    for name, value, target, unit in rows:
        out.append(
            {
                "measure": name,
                "value": value,
                "target": target,
                "unit": unit,
                "verdict": "PASS" if value is not None and value <= target else "MISS",
            }
        )
    return out


def render_markdown(r: dict) -> str:
    lines = ["| measure | value | target | verdict |", "|---|---:|---:|---|"]
    for v in r["verdicts"]:
        lines.append(
            f"| {v['measure']} | {fmt(v['value'], 2 if v['unit'] == 's' else 1)} {v['unit']} | ≤ {v['target']:g} {v['unit']} | {v['verdict']} |"
        )
    lines += [
        "",
        "| concurrent | direct p50 / p95 ms | sluice p50 / p95 ms | added p50 ms (min–max over pairs) | added p95 ms (min–max) | pooled added p50 / p95 | in: direct→sluice p50 ms | out: direct→sluice p50 ms | errors d/s | gen CPU max | server CPU ms/stream: sim alone → sluice tree |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, row in r["ttft"]["levels"].items():
        s50, s95 = row["added_p50_spread"], row["added_p95_spread"]
        lines.append(
            f"| {c} | {fmt(row['direct_p50_ms'])} / {fmt(row['direct_p95_ms'])} | {fmt(row['sluice_p50_ms'])} / {fmt(row['sluice_p95_ms'])} | "
            f"{fmt(row['added_p50_ms'])} ({fmt(s50['min'])}–{fmt(s50['max'])}) | {fmt(row['added_p95_ms'])} ({fmt(s95['min'])}–{fmt(s95['max'])}) | "
            f"{fmt(row['pooled_added_p50_ms'])} / {fmt(row['pooled_added_p95_ms'])} | "
            f"{fmt(row['direct_in_p50_ms'], 2)} → {fmt(row['sluice_in_p50_ms'], 2)} | {fmt(row['direct_out_p50_ms'], 2)} → {fmt(row['sluice_out_p50_ms'], 2)} | "
            f"{row['errors']['direct']}/{row['errors']['sluice']} | {row['generator_cpu_pct_max']:.0f}% | "
            f"{fmt(row['server_cpu_ms_per_stream']['direct'])} → {fmt(row['server_cpu_ms_per_stream']['sluice'])} |"
        )
    c = r["cancel"]
    lines += [
        "",
        "| cancel (client close → sim observes) | n | p50 ms | p95 ms | max ms | missed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in ("direct", "sluice"):
        lines.append(
            f"| {t} | {c[t]['n']} | {fmt(c[t]['p50_ms'], 2)} | {fmt(c[t]['p95_ms'], 2)} | {fmt(c[t]['max_ms'], 2)} | {c[t]['missed']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
