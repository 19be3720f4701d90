"""One Pool or several: sluice at SLUICE_POOLS=1 and SLUICE_POOLS=2, same load, same run.

    .venv/bin/python -m bench.pools [--levels 20,60,100] [--rounds 2] [--json out.json]

One simulated provider serves both gateways (started one after the other, in the order
1, 2, 1, 2, ... so that a change of the machine's load hits both). Every request has a
distinct prompt (nothing coalesces), `#sim ttft_ms=200 token_interval_ms=20 tokens=50`:
50 tokens/s per stream, the rate at which DESIGN.md measured one Pool saturating near 100
streams. At each concurrency level (closed loop, workers staggered) a block measures the
client-observed TTFT (p50/p95), the errors, and the sim's split of the added time: "in"
(client send -> sim receives the call) and "out" (sim's first byte -> client gets the
first delta; the data plane, which the Pool's loop carries). `direct` is the sim called
without sluice, for the added TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import fmt, log, machine, median, sigterm_as_interrupt, write_json
from bench.gateway import run_block, split_with_sim, url_of
from bench.load import GatewayProc, Sim, sim_stats

KNOBS = {"ttft_ms": 200, "token_interval_ms": 20, "tokens": 50}
ENV = {"SIMULATED_RPS": "1000", "SIMULATED_BURST": "1000", "SIMULATED_CONCURRENCY": "1000"}


async def blocks_for(sim: Sim, gw: GatewayProc | None, levels: list[int], per_worker: int) -> list[dict]:
    target = "direct" if gw is None else "sluice"
    out = []
    for c in levels:
        watch = gw.pids() if gw else {sim.proc.pid}
        block = await run_block(target, url_of(target, sim, gw), c, per_worker, KNOBS, watch)
        split_with_sim(block, sim_stats(sim.url))
        block.pop("results")
        out.append(block)
        log(
            f"{target} c={c:<4} n={block['n']} p50 {fmt(block['p50_ms'])} p95 {fmt(block['p95_ms'])} ms "
            f"in {fmt(block['in_p50_ms'], 2)} out p50/p95 {fmt(block['out_p50_ms'], 2)}/{fmt(block['out_p95_ms'], 2)} "
            f"errors {block['errors']} machine {block['machine_busy_pct']:.0f}% "
            f"server CPU {fmt(block['server_cpu_ms_per_stream'])} ms/stream"
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.pools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="20,60,100")
    parser.add_argument("--rounds", type=int, default=2, help="gateway starts per SLUICE_POOLS value")
    parser.add_argument("--per-worker", type=int, default=2)
    parser.add_argument("--pools", default="1,2")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    counts = [int(x) for x in args.pools.split(",") if x]
    results: dict = {"machine": machine(), "params": vars(args), "knobs": KNOBS, "runs": []}
    sim = Sim()
    with sigterm_as_interrupt():
        try:
            sim.start()
            results["direct"] = asyncio.run(blocks_for(sim, None, levels, args.per_worker))
            for rnd in range(args.rounds):
                for pools in counts:
                    gw = GatewayProc({**ENV, "SIMULATED_BASE_URL": sim.url, "SLUICE_POOLS": str(pools)}).start()
                    try:
                        log(f"round {rnd}: SLUICE_POOLS={pools}, {len(gw.pids())} processes")
                        time.sleep(1.0)
                        asyncio.run(run_block("sluice", url_of("sluice", sim, gw), 20, 1, KNOBS))  # warm-up
                        blocks = asyncio.run(blocks_for(sim, gw, levels, args.per_worker))
                        results["runs"].append({"pools": pools, "round": rnd, "blocks": blocks})
                    finally:
                        gw.stop()
        finally:
            sim.stop()
    results["summary"] = summarize(results, levels, counts)
    write_json(args.json, results)
    print(render_markdown(results))
    return results


def summarize(results: dict, levels: list[int], counts: list[int]) -> dict:
    direct = {b["concurrency"]: b for b in results["direct"]}
    out: dict = {}
    for pools in counts:
        for c in levels:
            blocks = [
                b for run in results["runs"] if run["pools"] == pools for b in run["blocks"] if b["concurrency"] == c
            ]
            d = direct.get(c, {})
            out[f"{pools}/{c}"] = {
                "pools": pools,
                "concurrency": c,
                "p50_ms": median([b["p50_ms"] for b in blocks]),
                "p95_ms": median([b["p95_ms"] for b in blocks]),
                "added_p50_ms": (median([b["p50_ms"] for b in blocks]) or 0) - (d.get("p50_ms") or 0),
                "out_p50_ms": median([b["out_p50_ms"] for b in blocks]),
                "out_p95_ms": median([b["out_p95_ms"] for b in blocks]),
                "errors": sum(b["errors"] for b in blocks),
                "n": sum(b["n"] for b in blocks),
                "cpu_ms_per_stream": median([b["server_cpu_ms_per_stream"] for b in blocks]),
                "machine_busy_pct": median([b["machine_busy_pct"] for b in blocks]),
            }
    return out


def render_markdown(r: dict) -> str:
    lines = [
        f"SLUICE_POOLS, {r['machine'].get('nproc', '?')} CPUs, `#sim ttft_ms=200 token_interval_ms=20 tokens=50`, "
        f"median over {r['params']['rounds']} gateway starts:",
        "",
        "| pools | streams | TTFT p50 | TTFT p95 | added p50 | sim first byte -> client p50 / p95 | errors | sluice CPU ms/stream | machine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["summary"].values():
        lines.append(
            f"| {row['pools']} | {row['concurrency']} | {fmt(row['p50_ms'])} | {fmt(row['p95_ms'])} | {fmt(row['added_p50_ms'])} | "
            f"{fmt(row['out_p50_ms'], 2)} / {fmt(row['out_p95_ms'], 2)} | {row['errors']}/{row['n']} | "
            f"{fmt(row['cpu_ms_per_stream'])} | {fmt(row['machine_busy_pct'], 0)} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
