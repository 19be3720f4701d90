"""SLUICE_WORKERS=1 vs 2 on this machine: sustained distinct streams through sluice, the
client-observed TTFT and the errors.

    python -m bench.workers [--streams 150] [--seconds 20] [--tokens-per-s 50]

Each run starts the simulated provider and `run.py` (bench/load.py), holds `--streams`
streams open at once for `--seconds` (each stream a distinct prompt: no coalescing; a
stream that ends is replaced at once), and reports TTFT p50/p95/p99 and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from bench.load import GatewayProc, Sim, new_pool, sim_prompt, stream_once


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sustain(url: str, streams: int, seconds: float, tokens_per_s: float) -> dict:
    pool = new_pool(streams + 10)
    results = []
    deadline = time.monotonic() + seconds
    interval_ms = round(1000 / tokens_per_s)

    async def one_lane(lane: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            prompt = sim_prompt(
                f"w{lane}-{n}-{uuid.uuid4().hex[:8]}", ttft_ms=100, tokens=100, token_interval_ms=interval_ms
            )
            results.append(await stream_once(pool, "sluice", url + "/api/chat", prompt, timeout=60))
            n += 1

    await asyncio.gather(*(one_lane(i) for i in range(streams)))
    await pool.aclose()
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None]
    return {
        "streams_done": sum(1 for r in results if r.complete),
        "errors": sum(1 for r in results if not r.complete),
        "ttft_p50_ms": round(pct(ttfts, 0.50), 1),
        "ttft_p95_ms": round(pct(ttfts, 0.95), 1),
        "ttft_p99_ms": round(pct(ttfts, 0.99), 1),
        "ttft_mean_ms": round(statistics.fmean(ttfts), 1) if ttfts else None,
    }


def run(workers: int, args) -> dict:
    sim = Sim().start()
    env = {
        "SIMULATED_BASE_URL": sim.url,
        "SLUICE_WORKERS": str(workers),
        "SLUICE_ACCESS_LOG": "0",
        "SIMULATED_RPS": "1000",
        "SIMULATED_BURST": "1000",
        "SIMULATED_CONCURRENCY": "1000",
    }
    gw = GatewayProc(env).start()
    try:
        time.sleep(2.0)  # let the second worker finish its start before measuring
        return asyncio.run(sustain(gw.url, args.streams, args.seconds, args.tokens_per_s))
    finally:
        gw.stop()
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--tokens-per-s", type=float, default=50)
    args = parser.parse_args()
    for workers in (1, 2):
        print(json.dumps({"workers": workers, **run(workers, args)}), flush=True)


if __name__ == "__main__":
    main()
