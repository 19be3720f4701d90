"""Soak: many concurrent slow streams for minutes; errors must stay 0, memory and open
files flat (issue 11). On demand only, never in the test suite.

It starts its own simulated provider and gateway (`run.py`, the whole actor system) with
the per-client connection cap off and the simulated account's Pacer wide open, then keeps
`--streams` streams open at all times for `--duration-s` seconds: each client opens a slow
stream (`--tokens` tokens, one every `--interval-ms`), reads it to its terminal event,
and opens the next one, until the time is up. By default prompts are distinct (no
coalescing): every stream is an upstream call of its own. The Pool runs at most 100
upstream streams at once per account (httpcore keeps one HTTP/2 connection per origin
and caps it at 100 concurrent streams; HTTP/1.1 pools hold 100 connections), so beyond
100 distinct streams the rest wait inside the Pool for a free stream: clients stay
connected (pings) but do not stream. `--prompts K` gives the clients K distinct prompts
(client n asks prompt n mod K): with K = 100, 1,000 clients stream live through 100
coalesced upstream calls, 10 per call, fanned out by the stream hub.

Every `--sample-s` seconds it samples the gateway's process tree (run.py and everything
under it): RSS summed over the processes, open file descriptors summed, and the number
of processes. At the end it compares the first and the last window (a minute, or a
quarter of the run when shorter) after the ramp-up: "flat" means within `--tolerance`
(RSS) and within 5 % + 20 descriptors (fds).

The client is one asyncio process on raw sockets (HTTP/1.1, `connection: close`, the
bytes scanned for the terminal event, nothing parsed), so it costs little CPU; its own
CPU share is reported.

    .venv/bin/python -m bench.soak [--streams 1000] [--duration-s 300] [--record]

Exit status 0 when errors == 0 and RSS and fds are flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from pathlib import Path

from bench.common import cpu_seconds, loadavg, raise_nofile, rss_kib

DONE = re.compile(rb'"type":\s*"done"')
ERROR = re.compile(rb'"type":\s*"error"[^}]*"code":\s*"([^"]+)"')


class Soak:
    def __init__(self, port: int, args):
        self.port, self.args = port, args
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.open_streams = 0
        self.opened = 0
        self.stop_at = 0.0

    def _error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    async def one_stream(self, n: int) -> None:
        a = self.args
        prompt = f"soak {n % a.prompts if a.prompts else f'{n} {time.time_ns()}'}\n#sim tokens={a.tokens} token_interval_ms={a.interval_ms} ttft_ms=200"
        body = json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode()
        head = (
            f"POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        deadline = a.tokens * a.interval_ms / 1000.0 + 60.0  # the stream's own length, plus room
        self.open_streams += 1
        self.opened += 1
        tail = b""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 30)
            try:
                writer.write(head + body)
                async with asyncio.timeout(deadline):
                    status = await reader.readline()
                    if b" 200 " not in status:
                        self._error(f"http_{status[9:12].decode(errors='replace')}")
                        return
                    while chunk := await reader.read(65536):
                        tail = (tail + chunk)[-2048:]
            finally:
                writer.close()
        except TimeoutError:
            self._error("client_deadline")
            return
        except OSError as exc:
            self._error(type(exc).__name__)
            return
        finally:
            self.open_streams -= 1
        if DONE.search(tail):
            self.ok += 1
        elif found := ERROR.search(tail):
            self._error(found.group(1).decode())
        else:
            self._error("no_terminal_event")

    async def client(self, n: int) -> None:
        i = 0
        while time.monotonic() < self.stop_at:
            await self.one_stream(n if self.args.prompts else n * 1_000_000 + i)
            i += 1

    async def run(self, sample) -> None:
        a = self.args
        self.stop_at = time.monotonic() + a.duration_s
        clients = []
        ramp_gap = a.ramp_s / a.streams
        for n in range(a.streams):  # spread the opening over the ramp: no thundering herd
            clients.append(asyncio.create_task(self.client(n)))
            await asyncio.sleep(ramp_gap)
        sampler = asyncio.create_task(sample(self))
        await asyncio.gather(*clients)
        sampler.cancel()


def tree_sample(pids) -> dict:
    rss = fds = procs = 0
    for pid in pids():
        kib = rss_kib(pid)
        if kib is None:
            continue
        procs += 1
        rss += kib
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return {"rss_mib": rss / 1024, "fds": fds, "procs": procs}


def window_means(samples: list[dict], ramp_s: float, end_s: float, window_s: float) -> tuple[dict, dict]:
    """Mean of the first and of the last `window_s` between the ramp-up and the wind-down."""
    steady = [s for s in samples if ramp_s <= s["t"] <= end_s]
    first = [s for s in steady if s["t"] < steady[0]["t"] + window_s]
    last = [s for s in steady if s["t"] > steady[-1]["t"] - window_s]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return (
        {k: mean(first, k) for k in ("rss_mib", "fds", "open")},
        {k: mean(last, k) for k in ("rss_mib", "fds", "open")},
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams kept open at once")
    parser.add_argument("--duration-s", type=float, default=300.0, help="how long (at most 900)")
    parser.add_argument("--tokens", type=int, default=15, help="tokens per stream")
    parser.add_argument("--interval-ms", type=int, default=2000, help="between two tokens (a slow stream)")
    parser.add_argument("--prompts", type=int, default=0, help="distinct prompts (0: every stream its own)")
    parser.add_argument("--ramp-s", type=float, default=20.0, help="open the streams over this long")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--tolerance", type=float, default=0.10, help="RSS: last window within this share of the first")
    parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.duration_s = min(args.duration_s, 900.0)  # bounded whatever is asked
    args.streams = min(args.streams, 5000)
    raise_nofile(4 * args.streams + 1024)  # inherited by the gateway's processes

    from actors.system import descendants
    from tests.support import running_gateway, running_sim

    env = {
        "SLUICE_MAX_CONNECTIONS_PER_CLIENT": "0",
        "SIMULATED_RPS": str(max(200, args.streams)),
        "SIMULATED_BURST": str(2 * args.streams),
        "SIMULATED_CONCURRENCY": str(2 * args.streams),
        "SIMULATED_RPM": "0",
        "PACER_MAX_QUEUE": str(4 * args.streams),
        "SLUICE_ACCESS_LOG": "0",
    }
    samples: list[dict] = []
    with running_sim() as sim, running_gateway({**env, "SIMULATED_BASE_URL": sim}) as gw:
        pids = lambda: descendants(gw.proc.pid) | {gw.proc.pid}  # noqa: E731
        soak = Soak(gw.port, args)
        started = time.monotonic()
        cpu0 = cpu_seconds(os.getpid())

        async def sample(soak: Soak) -> None:
            while True:
                row = {"t": time.monotonic() - started, "open": soak.open_streams, **tree_sample(pids)}
                samples.append(row)
                print(
                    f"t={row['t']:6.1f}s open={row['open']:5d} ok={soak.ok:6d} errors={sum(soak.errors.values()):4d} "
                    f"rss={row['rss_mib']:7.1f} MiB fds={row['fds']:5d} procs={row['procs']}",
                    flush=True,
                )
                await asyncio.sleep(args.sample_s)

        asyncio.run(soak.run(sample))
        elapsed = time.monotonic() - started
        client_cpu = (cpu_seconds(os.getpid()) - cpu0) / elapsed * 100.0

    window = min(60.0, args.duration_s / 4)
    first, last = window_means(samples, args.ramp_s + args.sample_s, args.duration_s, window)
    rss_growth = last["rss_mib"] / first["rss_mib"] - 1.0
    fd_growth = last["fds"] - first["fds"]
    rss_flat = rss_growth <= args.tolerance
    fds_flat = fd_growth <= 0.05 * first["fds"] + 20
    errors = sum(soak.errors.values())
    summary = (
        f"{args.streams} streams ({args.prompts or 'all'} distinct prompts) x {args.duration_s:.0f} s ({args.tokens} tokens every {args.interval_ms} ms, "
        f"{soak.ok} streams completed): errors {errors} {soak.errors or ''}; "
        f"RSS {first['rss_mib']:.0f} -> {last['rss_mib']:.0f} MiB ({rss_growth * 100:+.1f} %, "
        f"{'flat' if rss_flat else 'GROWING'}); fds {first['fds']:.0f} -> {last['fds']:.0f} "
        f"({'flat' if fds_flat else 'GROWING'}); open streams {first['open']:.0f} / {last['open']:.0f} "
        f"(first / last {window:.0f} s window); client CPU {client_cpu:.0f} % of a core; "
        f"loadavg at end {loadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(summary)
    if args.record:
        line = f"\n- `python -m bench.soak --streams {args.streams} --prompts {args.prompts} --duration-s {args.duration_s:.0f}` ({time.strftime('%Y-%m-%d')}): {summary}\n"
        with open(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "a") as out:
            out.write(line)
    return 0 if errors == 0 and rss_flat and fds_flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
