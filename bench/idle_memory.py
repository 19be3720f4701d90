"""Idle memory of sluice alone, per process (issue 13's "idle PSS ≤ 100 MiB at one worker
and one Pool"), in well under a minute: bench.cores' fake upstream and run.py, 20 streams
of a few tokens, `--idle-s` seconds idle, then PSS, RSS and private memory of every
process of the tree from /proc/<pid>/smaps_rollup.

    python -m bench.idle_memory [--runs 3] [--idle-s 3] [--workers 1] [--pools 1]

PSS splits shared pages among every process that maps them (other sluice processes on
the machine included), so alternate the variants being compared, a few runs each.
"""

from __future__ import annotations

import argparse
import time

from bench.common import log
from bench.cores import Sluice, Upstream
from bench.litellm.measure import run_cell


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup's fields in KiB ({} for a process gone)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {}
    return fields


def measure(args) -> dict:
    upstream = Upstream(ttft_ms=20, tokens=8, interval_ms=5, procs=1).start()
    sluice = None
    try:
        sluice = Sluice(upstream.url, args.workers, args.pools, h2c=True).start()
        spec = {
            "target": sluice.target(),
            "concurrency": 20,
            "per_worker": 1,
            "warmup": 0,
            "stagger_s": 0.1,
            "timeout_s": 30,
            "nonce": f"idle{time.monotonic_ns()}",
        }
        done = run_cell(spec, hard_timeout=120)
        errors = sum(1 for r in done["records"] if not r["ok"])
        time.sleep(args.idle_s)  # the streams' buffers go, the processes settle: this is "idle"
        roles = sluice.roles()
        rows = []
        for pid, role in sorted(roles.items(), key=lambda kv: kv[1]):
            r = rollup(pid)
            rows.append(
                {
                    "pid": pid,
                    "role": role,
                    "pss": r.get("Pss", 0) / 1024,
                    "rss": r.get("Rss", 0) / 1024,
                    "private": (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024,
                }
            )
        return {"rows": rows, "errors": errors}
    finally:
        if sluice is not None:
            sluice.stop()
        upstream.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--pools", type=int, default=1)
    p.add_argument("--per-process", action="store_true", help="print every process, not only the totals")
    args = p.parse_args()
    for run in range(args.runs):
        result = measure(args)
        rows = result["rows"]
        if args.per_process:
            for row in rows:
                log(
                    f"  {row['role']:<40} PSS {row['pss']:6.1f}  RSS {row['rss']:6.1f}  private {row['private']:6.1f} MiB"
                )
        total = {k: sum(row[k] for row in rows) for k in ("pss", "rss", "private")}
        log(
            f"run {run + 1}: sluice idle PSS {total['pss']:.1f} MiB, RSS {total['rss']:.1f} MiB, private "
            f"{total['private']:.1f} MiB ({len(rows)} processes, {result['errors']} stream errors)"
        )


if __name__ == "__main__":
    main()
