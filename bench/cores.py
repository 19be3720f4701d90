"""Use every core (issue 13): sluice against a bare pass-through proxy, the floor, in one run.

    .venv/bin/python -m bench.cores --quick          # ~2-3 minutes, 3 rounds (a smoke run)
    .venv/bin/python -m bench.cores --scaling 1,2     # ~10 minutes on 2 cores, 5 rounds
    .venv/bin/python -m bench.cores --device         # a 16-core machine: --scaling 1,2,4,8 --levels 100,200 --workers 6

Three processes under test, all on loopback, each started here and stopped at the end:

* the upstream: `bench/fake_upstream.py`, an OpenAI-compatible SSE server that is not
  sluice's simulated provider (200 ms TTFT, 32 tokens 20 ms apart by default; HTTP/1.1 and
  h2c on one port; several copies on one port with `--upstream-procs`);
* the floor: `bench/floor_proxy.py` under `uvicorn --workers N`, a bare Starlette +
  httpcore streaming pass-through;
* sluice: `run.py` with `SLUICE_PROVIDER=openai` pointed at the upstream, coalescing off
  (every request a real call), the pacer's limits out of reach, no per-client cap, and
  `SLUICE_WORKERS` / `SLUICE_POOLS` passed through (what was asked and what ran are both
  recorded: the processes listening on the edge port, and the Pool actors).

Measures, the targets interleaved within each round (direct, floor, sluice; the order
rotates each round): client TTFT (send -> first delta) at 1 and 20 concurrent streams and
the added TTFT (the gateway's minus the upstream's called directly in the same round);
CPU per 1,000 tokens of every process (from /proc); a load ladder for the largest load
whose added TTFT p95 stays <= 100 ms without errors; idle PSS and RSS of every process;
and optionally scaling (`--scaling`: the ladder per worker count) and fixed levels
(`--levels`: added TTFT at given loads with `--workers` each).

Writes bench/results/cores-<time>.json and the section "Use every core (issue 13)" of
docs/benchmarks.md (between its markers; bench.run_all keeps it). The load generator is
bench/litellm_loadgen.py, one process per cell (several above ~200 streams on a machine
with cores to spare), so its CPU is measured on its own.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    ROOT,
    alive,
    cpu_seconds,
    descendants,
    fmt,
    free_port,
    kill_pids,
    loadavg,
    log,
    machine,
    median,
    pss_kib,
    raise_nofile,
    rss_kib,
    sigterm_as_interrupt,
    spread,
    system_cpu_busy,
    wait_for_quiet,
    write_json,
)
from bench.litellm.measure import run_cell, summarize_streams
from bench.load import GatewayProc

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench.cores:begin -->", "<!-- bench.cores:end -->"
GATEWAYS = ("floor", "sluice")
TARGETS = ("direct",) + GATEWAYS
ADDED_P95_LIMIT_MS = 100.0


# --- the processes under test ---------------------------------------------------------------------
def _tree(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    return {p for p in (descendants(pid) | {pid}) if alive(p)}


def _stop_tree(proc: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    if proc is None:
        return
    tree = _tree(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_pids(tree | _tree(proc.pid))


def _pythonpath() -> str:
    """The checkout first, then whatever PYTHONPATH already holds (bench/offline.sh's wheels)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    import httpcore

    deadline = time.monotonic() + timeout
    with httpcore.ConnectionPool() as pool:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            try:
                if (
                    pool.request(
                        "GET", url, extensions={"timeout": {"connect": 1, "read": 2, "write": 1, "pool": 1}}
                    ).status
                    == 200
                ):
                    return
            except (httpcore.ConnectError, httpcore.ReadTimeout, httpcore.RemoteProtocolError, httpcore.ReadError):
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout}s")


class Upstream:
    """`--procs` copies of bench/fake_upstream.py sharing one port."""

    def __init__(self, ttft_ms: float, tokens: int, interval_ms: float, procs: int):
        self.knobs = ["--ttft-ms", str(ttft_ms), "--tokens", str(tokens), "--interval-ms", str(interval_ms)]
        self.nprocs = procs
        self.procs: list[subprocess.Popen] = []
        self.port: int | None = None

    def start(self) -> Upstream:
        argv = [sys.executable, "-m", "bench.fake_upstream", "--reuse-port", *self.knobs]
        first = subprocess.Popen([*argv, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.procs.append(first)
        line = first.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"fake upstream did not start: {line}")
        self.port = int(line[1])
        for _ in range(self.nprocs - 1):
            self.procs.append(subprocess.Popen([*argv, "--port", str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL))
        _wait_http(f"{self.url}/health", first, 15, "fake upstream")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.poll() is None}

    def target(self) -> dict:
        return {
            "name": "direct",
            "host": "127.0.0.1",
            "port": self.port,
            "path": "/v1/chat/completions",
            "format": "openai",
        }

    def stop(self) -> None:
        for p in self.procs:
            _stop_tree(p, 5)


class Floor:
    """bench/floor_proxy.py under `uvicorn --workers N` (uvloop and httptools when installed, as sluice's edge)."""

    def __init__(self, upstream_url: str, workers: int):
        self.port = free_port()
        self.workers = workers
        self.upstream_url = upstream_url
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.floor_proxy:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "5",
        ]

    def start(self) -> Floor:
        env = {**os.environ, "FLOOR_UPSTREAM": self.upstream_url, "PYTHONPATH": _pythonpath()}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{self.port}/health", self.proc, 60, "floor proxy")
        # Every worker answers before the measures start (uvicorn spawns them one after another).
        deadline = time.monotonic() + 60
        while len(self.pids()) < (self.workers + 1 if self.workers > 1 else 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def pids(self) -> set[int]:
        return _tree(self.proc.pid if self.proc else None)

    def roles(self) -> dict[int, str]:
        if self.workers == 1:
            return {self.proc.pid: "floor: uvicorn (one process)"}
        from bench.common import cmdline

        out = {}
        for pid in self.pids():
            if pid == self.proc.pid:
                out[pid] = "floor: uvicorn supervisor"
            elif "resource_tracker" in cmdline(pid):
                out[pid] = "floor: multiprocessing tracker"
            else:
                out[pid] = "floor: worker"
        return out

    def target(self) -> dict:
        return {
            "name": "floor",
            "host": "127.0.0.1",
            "port": self.port,
            "path": "/v1/chat/completions",
            "format": "openai",
        }

    def stop(self) -> None:
        _stop_tree(self.proc)
        self.proc = None


class Sluice:
    """run.py pointed at the fake upstream as its OpenAI provider (bench/load.py's GatewayProc)."""

    def __init__(self, upstream_url: str, workers: int, pools: int, h2c: bool):
        high = "1000000"
        self.env = {
            "SLUICE_PROVIDER": "openai",
            "OPENAI_BASE_URL": upstream_url,
            "OPENAI_API_KEY": "sk-bench-not-a-real-key",
            # actors/pool.py caps an HTTP/1.1 upstream at 100 connections; h2c multiplexes.
            "OPENAI_H2C": "1" if h2c else "0",
            "OPENAI_RPS": high,
            "OPENAI_BURST": high,
            "OPENAI_CONCURRENCY": high,
            "PACER_MAX_QUEUE": high,
            "COALESCE_ENABLED": "0",
            "SLUICE_MAX_CONNECTIONS_PER_CLIENT": "0",
            "SLUICE_ACCESS_LOG": "0",
            "SLUICE_LOG_LEVEL": "WARNING",
            "SLUICE_WORKERS": str(workers),
            "SLUICE_POOLS": str(pools),
            "PYTHONPATH": _pythonpath(),
        }
        self.asked = {"SLUICE_WORKERS": workers, "SLUICE_POOLS": pools}
        self.gw = GatewayProc(self.env)
        self.role_of: dict[int, str] = {}

    def start(self) -> Sluice:
        self.gw.start(timeout=90)
        self.role_of = self._roles()
        return self

    def _roles(self) -> dict[int, str]:
        from bench.common import cmdline
        from bench.profile import roles_of
        from sim.testing import listening_ports

        roles = roles_of(self.gw)
        for pid in self.gw.pids():
            if " actors.watchdog " in cmdline(pid) or " actors.system watch " in cmdline(pid):
                roles[pid] = "watchdog"
            if self.gw.gw.port in {port for _, port in listening_ports({pid})} and not roles.get(pid, "").startswith(
                "edge"
            ):
                roles[pid] = "edge worker"
        return roles

    def ran(self) -> dict:
        """What ran: processes listening on the edge's port, and Pool actors."""
        edges = sum(1 for r in self.role_of.values() if r.startswith("edge"))
        pools = sum(1 for r in self.role_of.values() if "pool" in r.lower())
        return {"edges": edges, "pools": pools, "processes": len(self.gw.pids())}

    def pids(self) -> set[int]:
        return self.gw.pids()

    def roles(self) -> dict[int, str]:
        return {pid: "sluice: " + self.role_of.get(pid, "other") for pid in self.pids()}

    def target(self) -> dict:
        return {"name": "sluice", "host": "127.0.0.1", "port": self.gw.gw.port, "path": "/api/chat", "format": "sluice"}

    def stop(self) -> None:
        self.gw.stop()


# --- measuring ------------------------------------------------------------------------------------
def snapshot(pids) -> dict[int, float]:
    return {p: cpu_seconds(p) or 0.0 for p in pids}


def cpu_by_role(before: dict[int, float], after: dict[int, float], roles: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, t1 in after.items():
        role = roles.get(pid, "other")
        out[role] = out.get(role, 0.0) + max(0.0, t1 - before.get(pid, 0.0))
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.upstream: Upstream | None = None
        self.floor: Floor | None = None
        self.sluice: Sluice | None = None
        self.nonce = 0
        self.results: dict = {"meta": {}, "phases": {}}

    # lifecycle
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def out_of_time(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def start_gateways(self, workers: int, pools: int) -> None:
        self.stop_gateways()
        log(
            f"starting the floor (uvicorn --workers {workers}) and sluice (SLUICE_WORKERS={workers} SLUICE_POOLS={pools})"
        )
        self.floor = Floor(self.upstream.url, workers).start()
        self.sluice = Sluice(self.upstream.url, workers, pools, self.args.upstream_http == "h2c").start()
        log(f"  floor: {len(self.floor.pids())} processes; sluice: {self.sluice.ran()}")

    def stop_gateways(self) -> None:
        for thing in (self.sluice, self.floor):
            if thing is not None:
                try:
                    thing.stop()
                except Exception as exc:  # keep stopping the others
                    log(f"stopping {type(thing).__name__} failed: {exc!r}")
        self.sluice = self.floor = None

    def stop(self) -> None:
        self.stop_gateways()
        if self.upstream is not None:
            self.upstream.stop()

    def roles(self) -> dict[int, str]:
        roles = dict.fromkeys(self.upstream.pids(), "upstream (fake)")
        for thing in (self.floor, self.sluice):
            if thing is not None:
                roles.update(thing.roles())
        return roles

    def target(self, name: str) -> dict:
        return {"direct": self.upstream, "floor": self.floor, "sluice": self.sluice}[name].target()

    # one cell
    def cell(self, name: str, conc: int, per_worker: int, warmup: int = 1) -> dict:
        """`conc` concurrent streams, each worker `per_worker` back to back (the first
        `warmup` not counted), workers ramped in over one stream's duration."""
        a = self.args
        self.nonce += 1
        stream_s = (a.ttft_ms + a.interval_ms * a.tokens) / 1000
        loadgens = max(1, min(a.loadgens or max(1, (os.cpu_count() or 2) // 4), math.ceil(conc / 200)))
        specs = []
        for i in range(loadgens):
            share = conc // loadgens + (1 if i < conc % loadgens else 0)
            specs.append(
                {
                    "target": self.target(name),
                    "concurrency": share,
                    "per_worker": per_worker,
                    "warmup": warmup,
                    "stagger_s": stream_s,
                    "timeout_s": 30,
                    "nonce": f"c{self.nonce}g{i}",
                }
            )
        roles = self.roles()
        before = snapshot(roles)
        busy0, total0 = system_cpu_busy()
        w0 = time.monotonic()
        with ThreadPoolExecutor(loadgens) as ex:
            parts = list(ex.map(lambda s: run_cell(s, hard_timeout=30 * per_worker + 120), specs))
        wall = time.monotonic() - w0
        busy1, total1 = system_cpu_busy()
        after = snapshot(roles)
        merged = {
            "records": [r for p in parts for r in p["records"]],
            "wall_s": max(p["wall_s"] for p in parts),
            "loadgen_cpu_s": sum(p["loadgen_cpu_s"] for p in parts),
        }
        s = summarize_streams(merged)
        by_role = cpu_by_role(before, after, roles)
        by_role["client (load generator)"] = merged["loadgen_cpu_s"]
        ncores = os.cpu_count() or 1
        machine_cpu = (busy1 - busy0) / max(1, total1 - total0) * ncores * wall
        for k in ("error_details",):
            s.pop(k, None)
        s.update(
            {
                "target": name,
                "conc": conc,
                "loadgens": loadgens,
                "cpu_by_role": by_role,
                "foreign_cores": max(0.0, (machine_cpu - sum(by_role.values())) / max(wall, 1e-6)),
                "loadavg": loadavg()[0],
            }
        )
        return s

    def quiet(self, label: str) -> None:
        """Other people's tests share this machine: before a round, wait (bounded) for it to be
        under 35 % busy; what was seen is kept with the results either way."""
        seen = wait_for_quiet(35.0, self.args.quiet_wait_s)
        seen["label"] = label
        self.results.setdefault("quiet", []).append(seen)
        if not seen["quiet"]:
            log(
                f"  {label}: the machine is still {seen['busy_pct']:.0f} % busy after {seen['waited_s']:.0f} s; measuring anyway"
            )

    def order(self, rnd: int, names=TARGETS) -> list[str]:
        k = rnd % len(names)
        return list(names[k:]) + list(names[:k])

    # measures
    def idle_memory(self, label: str) -> dict:
        time.sleep(self.args.idle_s)  # let the last streams' buffers go and the processes settle
        roles = self.roles()
        procs = []
        for pid, role in sorted(roles.items(), key=lambda kv: kv[1]):
            procs.append({"pid": pid, "role": role, "pss_kib": pss_kib(pid), "rss_kib": rss_kib(pid)})
        totals = {}
        for side in ("floor", "sluice", "upstream"):
            mine = [p for p in procs if p["role"].startswith(side)]
            totals[side] = {
                "pss_mib": sum(p["pss_kib"] or 0 for p in mine) / 1024,
                "rss_mib": sum(p["rss_kib"] or 0 for p in mine) / 1024,
                "procs": len(mine),
            }
        log(
            f"  idle ({label}): "
            + ", ".join(
                f"{k} PSS {v['pss_mib']:.0f} MiB RSS {v['rss_mib']:.0f} MiB ({v['procs']} processes)"
                for k, v in totals.items()
            )
        )
        return {"procs": procs, "totals": totals}

    def warmup(self) -> None:
        for name in TARGETS:
            s = self.cell(name, 5, 2, 0)
            if s["errors"]:
                log(f"  warm-up {name}: {s['errors']} errors {s['error_kinds']}")

    def ttft_rounds(self) -> dict:
        a = self.args
        rows = []
        for rnd in range(a.rounds):
            for conc in (1, 20):
                self.quiet(f"round {rnd + 1} c={conc}")
                per_worker = 1 + (a.samples_1 if conc == 1 else a.samples_20)
                line = {}
                for name in self.order(rnd):
                    s = self.cell(name, conc, per_worker)
                    s["round"] = rnd
                    rows.append(s)
                    line[name] = s
                d = line["direct"]
                log(
                    f"  round {rnd + 1}/{a.rounds} c={conc:<2d} upstream p50 {fmt(d['ttft_p50'])} ms | "
                    + " | ".join(
                        f"{g} added p50 {fmt(_sub(line[g]['ttft_p50'], d['ttft_p50']))} p95 {fmt(_sub(line[g]['ttft_p95'], d['ttft_p95']))} ms"
                        + (f" ERR {line[g]['errors']}" if line[g]["errors"] else "")
                        for g in GATEWAYS
                    )
                    + f" (others on the machine: {max(c['foreign_cores'] for c in line.values()):.1f} cores)"
                )
        return {"cells": rows, "summary": summarize_ttft(rows)}

    def ladder(self, label: str, levels: list[int], rounds: int, max_streams: int) -> dict:
        """Each gateway climbs until a level's added TTFT p95 (median over rounds) passes
        ADDED_P95_LIMIT_MS or any stream fails; levels double past the list up to max_streams."""
        levels = [n for n in levels if n <= max_streams] or [max_streams]
        while levels[-1] * 2 <= max_streams:
            levels.append(levels[-1] * 2)
        active = list(GATEWAYS)
        steps, largest = [], dict.fromkeys(GATEWAYS, 0)
        for conc in levels:
            if not active:
                break
            if self.out_of_time():
                log(f"  {label}: out of time budget before {conc} streams; the ladder stops here")
                steps.append({"conc": conc, "cut_short": True})
                break
            cells: dict[str, list[dict]] = {n: [] for n in ["direct", *active]}
            per_worker = 1 + max(2, math.ceil(16 / conc))
            for rnd in range(rounds):
                self.quiet(f"{label} {conc} streams round {rnd + 1}")
                for name in self.order(rnd, ("direct", *active)):
                    cells[name].append(self.cell(name, conc, per_worker))
            step = {"conc": conc, "direct_p95": median(c["ttft_p95"] for c in cells["direct"])}
            for g in active:
                added = [_sub(c["ttft_p95"], d["ttft_p95"]) for c, d in zip(cells[g], cells["direct"])]
                errors = sum(c["errors"] for c in cells[g])
                a = median(added)
                ok = a is not None and a <= ADDED_P95_LIMIT_MS and errors == 0
                step[g] = {
                    "added_p95": a,
                    "added_p95_rounds": added,
                    "errors": errors,
                    "pass": ok,
                    "ttft_p95": median(c["ttft_p95"] for c in cells[g]),
                    "foreign_cores": median(c["foreign_cores"] for c in cells[g]),
                }
                if ok:
                    largest[g] = conc
            steps.append(step)
            log(
                f"  {label} {conc:>4d} streams: upstream p95 {fmt(step['direct_p95'])} ms | "
                + " | ".join(
                    f"{g} added p95 {fmt(step[g]['added_p95'])} ms, {step[g]['errors']} errors -> {'pass' if step[g]['pass'] else 'FAIL'}"
                    for g in active
                )
            )
            active = [g for g in active if step[g]["pass"]]
        return {"steps": steps, "largest": largest, "levels": levels, "still_passing_at_top": active}

    def fixed_levels(self, levels: list[int], rounds: int) -> dict:
        rows = []
        for conc in levels:
            if self.out_of_time():
                log(f"  levels: out of time budget before {conc} streams")
                break
            per_worker = 1 + max(2, math.ceil(16 / conc))
            cells: dict[str, list[dict]] = {n: [] for n in TARGETS}
            for rnd in range(rounds):
                self.quiet(f"level {conc} round {rnd + 1}")
                for name in self.order(rnd):
                    cells[name].append(self.cell(name, conc, per_worker))
            row = {"conc": conc}
            for g in GATEWAYS:
                row[g] = {
                    q: median(_sub(c[f"ttft_{q}"], d[f"ttft_{q}"]) for c, d in zip(cells[g], cells["direct"]))
                    for q in ("p50", "p95")
                }
                row[g]["errors"] = sum(c["errors"] for c in cells[g])
            rows.append(row)
            log(
                f"  {conc} streams: "
                + " | ".join(
                    f"{g} added p50/p95 {fmt(row[g]['p50'])}/{fmt(row[g]['p95'])} ms, errors {row[g]['errors']}"
                    for g in GATEWAYS
                )
            )
        return {"rows": rows, "workers": self.args.workers}

    # the run
    def run(self) -> dict:
        a = self.args
        self.results["meta"] = {
            "machine": machine(),
            "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv[1:],
            "quick": a.quick,
            "upstream": {
                "ttft_ms": a.ttft_ms,
                "tokens": a.tokens,
                "interval_ms": a.interval_ms,
                "procs": a.upstream_procs,
                "sluice_speaks": a.upstream_http,
                "floor_speaks": "http/1.1",
            },
            "rounds": a.rounds,
        }
        self.upstream = Upstream(a.ttft_ms, a.tokens, a.interval_ms, a.upstream_procs).start()
        log(f"fake upstream on {self.upstream.url} ({a.upstream_procs} process(es))")
        phases = self.results["phases"]
        self.start_gateways(a.workers, a.pools)
        base = phases["baseline"] = {
            "workers": a.workers,
            "pools": a.pools,
            "asked": self.sluice.asked,
            "ran": self.sluice.ran(),
        }
        log("warm-up")
        self.warmup()
        base["idle"] = self.idle_memory(f"{a.workers} worker(s)")
        log(f"TTFT at 1 and 20 streams: {a.rounds} rounds, direct/floor/sluice interleaved")
        base["ttft"] = self.ttft_rounds()
        if not a.no_ladder:
            log(f"load ladder from {a.ladder} (stops at added p95 > {ADDED_P95_LIMIT_MS:.0f} ms or an error)")
            base["ladder"] = self.ladder("ladder", a.ladder, a.ladder_rounds, a.max_streams)
        if a.levels:
            log(f"fixed levels {a.levels} with {a.workers} worker(s) each")
            base["levels"] = self.fixed_levels(a.levels, a.ladder_rounds)
        if a.scaling:
            scaling = phases["scaling"] = {"rows": []}
            for n in a.scaling:
                if self.out_of_time():
                    log(f"scaling: out of time budget before {n} workers")
                    scaling["cut_short_at"] = n
                    break
                if n == a.workers and n == a.pools and "ladder" in base:
                    row = {
                        "n": n,
                        "asked": base["asked"],
                        "ran": base["ran"],
                        "idle": base["idle"],
                        "ladder": base["ladder"],
                    }
                else:
                    self.start_gateways(n, n)
                    self.warmup()
                    row = {
                        "n": n,
                        "asked": self.sluice.asked,
                        "ran": self.sluice.ran(),
                        "idle": self.idle_memory(f"{n} workers"),
                    }
                    row["ladder"] = self.ladder(f"scaling n={n}", a.ladder, a.ladder_rounds, a.max_streams)
                scaling["rows"].append(row)
        self.results["meta"]["loadavg_at_end"] = loadavg()
        self.results["meta"]["wall_s"] = self.elapsed()
        return self.results


def _sub(a, b):
    return None if a is None or b is None else a - b


def summarize_ttft(rows: list[dict]) -> dict:
    """Per level and gateway: added TTFT p50/p95 per round (gateway minus the upstream called
    directly in the same round), their median and spread; CPU per 1,000 tokens per role."""
    out: dict = {}
    for conc in sorted({r["conc"] for r in rows}):
        at = [r for r in rows if r["conc"] == conc]
        direct = {r["round"]: r for r in at if r["target"] == "direct"}
        level = {"direct": {q: spread([r[f"ttft_{q}"] for r in direct.values()]) for q in ("p50", "p95")}}
        for g in GATEWAYS:
            mine = [r for r in at if r["target"] == g]
            added = {q: [_sub(r[f"ttft_{q}"], direct[r["round"]][f"ttft_{q}"]) for r in mine] for q in ("p50", "p95")}
            cpu: dict[str, list[float]] = {}
            for r in mine:
                if r["tokens"]:
                    for role, sec in r["cpu_by_role"].items():
                        cpu.setdefault(role, []).append(sec / r["tokens"] * 1e6)  # ms per 1,000 tokens
            level[g] = {
                "ttft": {q: spread([r[f"ttft_{q}"] for r in mine]) for q in ("p50", "p95")},
                "added": {q: spread(v) for q, v in added.items()},
                "errors": sum(r["errors"] for r in mine),
                "cpu_ms_per_1k_tokens": {role: median(v) for role, v in cpu.items()},
                "foreign_cores": spread([r["foreign_cores"] for r in mine]),
            }
        out[str(conc)] = level
    return out


def gateway_cpu(per_role: dict[str, float], side: str) -> float:
    return sum(v for k, v in per_role.items() if k.startswith(side) and v is not None)


# --- verdicts and the report ----------------------------------------------------------------------
def verdicts(r: dict) -> list[dict]:
    base = r["phases"]["baseline"]
    out = []

    def check(name, value, limit, ok, note=""):
        out.append({"target": name, "value": value, "limit": limit, "pass": ok, "note": note})

    summ = base["ttft"]["summary"]
    for conc in ("1", "20"):
        v = summ[conc]["sluice"]["added"]["p50"]["median"]
        check(f"added TTFT p50 at {conc} stream(s) ≤ 5 ms", fmt(v, 1, " ms"), "5 ms", v is not None and v <= 5)
    s95, f95 = summ["20"]["sluice"]["added"]["p95"]["median"], summ["20"]["floor"]["added"]["p95"]["median"]
    ratio = s95 / f95 if s95 is not None and f95 and f95 > 0 else None
    check(
        "added TTFT p95 at 20 streams ≤ 1.5× the floor's",
        f"{fmt(s95, 1)} vs {fmt(f95, 1)} ms ({fmt(ratio, 2)}×)",
        "1.5×",
        ratio is not None and ratio <= 1.5,
        "" if f95 and f95 > 1 else "the floor adds ~nothing: the ratio is fragile",
    )
    cpu = summ["20"]
    sc, fc = (
        gateway_cpu(cpu["sluice"]["cpu_ms_per_1k_tokens"], "sluice"),
        gateway_cpu(cpu["floor"]["cpu_ms_per_1k_tokens"], "floor"),
    )
    check(
        "CPU per 1,000 tokens ≤ 1.2× the floor's (at 20 streams)",
        f"{sc:.0f} vs {fc:.0f} ms ({sc / fc:.2f}×)" if fc else "—",
        "1.2×",
        bool(fc) and sc / fc <= 1.2,
    )
    if "ladder" in base:
        lad = base["ladder"]["largest"]
        check(
            "largest load with added p95 ≤ 100 ms ≥ the floor's",
            f"{lad['sluice']} vs {lad['floor']} streams",
            "≥ floor",
            lad["sluice"] >= lad["floor"] and lad["floor"] > 0,
        )
    idle = base["idle"]["totals"]["sluice"]
    check(
        f"idle PSS of all sluice processes ≤ 100 MiB ({base['workers']} worker, {base['pools']} Pool asked)",
        f"{idle['pss_mib']:.0f} MiB (RSS {idle['rss_mib']:.0f} MiB, {idle['procs']} processes)",
        "100 MiB",
        idle["pss_mib"] <= 100 if base["workers"] == base["pools"] == 1 else None,
        "" if base["workers"] == base["pools"] == 1 else "informational: the target is for 1 worker and 1 Pool",
    )
    scaling = r["phases"].get("scaling")
    if scaling and len(scaling["rows"]) > 1:
        first, last = scaling["rows"][0], scaling["rows"][-1]
        s1, sn = first["ladder"]["largest"]["sluice"], last["ladder"]["largest"]["sluice"]
        x = sn / s1 if s1 else None
        big = (r["meta"]["machine"]["nproc"] or 0) >= 16 and last["n"] >= 8
        check(
            f"scaling: sustained streams at {last['n']} workers vs {first['n']}",
            f"{sn} vs {s1} ({fmt(x, 1)}×)",
            "≥ 6× at 8 vs 1 (16 cores)",
            (x is not None and x >= 6) if big else None,
            "" if big else f"informational: {r['meta']['machine']['nproc']} cores, not the 16-core target",
        )
    lv = base.get("levels")
    if lv:
        big = (r["meta"]["machine"]["nproc"] or 0) >= 16 and lv["workers"] == 6
        for row in lv["rows"]:
            for q in ("p50", "p95"):
                s, f = row["sluice"][q], row["floor"][q]
                x = s / f if s is not None and f and f > 0 else None
                check(
                    f"added {q} at {row['conc']} streams ≤ 1.5× the floor's ({lv['workers']} workers each)",
                    f"{fmt(s, 1)} vs {fmt(f, 1)} ms ({fmt(x, 2)}×)",
                    "1.5×",
                    (x is not None and x <= 1.5 and row["sluice"]["errors"] == 0) if big else None,
                    "" if big else "informational: needs 6 workers on a 16-core machine",
                )
    return out


HOW_TO_16 = """\
On a 16-core machine without network (Python 3.12): on a machine with network, `bench/offline.sh download`
puts the wheels of `bench/wheels.txt` (this venv's versions of sluice's runtime dependencies; Thespian is
built into a wheel from its sdist) in `.whl/`; carry `.whl/` and the checkout there, then
`bench/offline.sh run --device` installs them into a target folder (`pip --no-index`) and runs this benchmark
(`--device` = `--scaling 1,2,4,8 --levels 100,200 --workers 6`, sized for one 10-minute command;
`--upstream-procs` and `--loadgens` default to a quarter of the cores there, so neither the fake upstream
nor the client is the first to saturate; the issue measured the bare proxy at +7/+13 ms p50/p95 at 100
streams and +51/+187 ms at 200 there). Not run yet: no 16-core machine was available to this session."""


def render(r: dict) -> str:
    m, base = r["meta"], r["phases"]["baseline"]
    mach = m["machine"]
    lines = [
        BEGIN,
        "## Use every core (issue 13)",
        "",
        f"`.venv/bin/python -m bench.cores {' '.join(m['argv'])}`".replace(" `", "`") + f" — {m['started_utc']}, "
        f"{m['wall_s'] / 60:.1f} min, commit {mach['git_commit']}{' (+ uncommitted changes)' if mach['git_dirty_files'] else ''}. "
        f"Machine: {mach['nproc']} cores ({mach['cpu_model']}), Python {mach['python']}; load average "
        f"{'/'.join(f'{x:.1f}' for x in mach['loadavg_at_start'])} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in m['loadavg_at_end'])} at the end"
        + (
            " — a shared box: other work ran alongside (the 'others' column)."
            if mach["loadavg_at_start"][0] > 1.0
            else "."
        ),
        "",
        f"Upstream: `bench/fake_upstream.py` ({m['upstream']['ttft_ms']:.0f} ms TTFT, {m['upstream']['tokens']} tokens "
        f"{m['upstream']['interval_ms']:.0f} ms apart, {m['upstream']['procs']} process(es)); sluice speaks "
        f"{m['upstream']['sluice_speaks']} to it, the floor HTTP/1.1. Floor: `bench/floor_proxy.py` (Starlette + httpcore "
        f"pass-through) under `uvicorn --workers {base['workers']}`. sluice: `run.py`, SLUICE_PROVIDER=openai, "
        f"COALESCE_ENABLED=0, pacer limits 10^6, asked {base['asked']}, ran {base['ran']['edges']} edge process(es) and "
        f"{base['ran']['pools']} Pool(s) ({base['ran']['processes']} processes). {m['rounds']} rounds; in each the upstream "
        "called directly, the floor and sluice run one after another (order rotating); added TTFT = the gateway's client "
        "TTFT minus the direct one of the same round; the figures are medians over rounds (min–max in brackets)."
        + (" **Quick run: fewer rounds and samples; not a target-grade measurement.**" if m["quick"] else ""),
        "",
    ]
    quiet = r.get("quiet") or []
    if quiet:
        busy = spread([q["busy_pct"] for q in quiet])
        loud = sum(1 for q in quiet if not q["quiet"])
        lines += [
            f"Before each round the run waited (up to {max(q['waited_s'] for q in quiet):.0f} s) for the machine to be under "
            f"35 % busy: busy {fmt(busy['min'], 0)}–{fmt(busy['max'], 0)} % (median {fmt(busy['median'], 0)} %) when the "
            f"rounds started; {loud} of {len(quiet)} rounds started on a busier machine"
            + (
                " — **other work competed for the cores: read the figures as noisy**."
                if loud > len(quiet) // 3
                else "."
            ),
            "",
        ]
    lines += [
        "| target | measured | limit | verdict |",
        "|---|---|---|---|",
    ]
    for v in verdicts(r):
        verdict = "info" if v["pass"] is None else ("PASS" if v["pass"] else "FAIL")
        lines.append(
            f"| {v['target']} | {v['value']} | {v['limit']} | {verdict}{' — ' + v['note'] if v['note'] else ''} |"
        )
    summ = base["ttft"]["summary"]

    def sp(s, d=1):
        return f"{fmt(s['median'], d)} ({fmt(s['min'], d)}–{fmt(s['max'], d)})"

    lines += [
        "",
        "| streams | upstream direct TTFT p50 / p95 | gateway | client TTFT p50 | added p50 | added p95 | errors | others (cores) |",
        "|---:|---|---|---|---|---|---:|---|",
    ]
    for conc, level in summ.items():
        d = level["direct"]
        for g in GATEWAYS:
            x = level[g]
            lines.append(
                f"| {conc} | {fmt(d['p50']['median'])} / {fmt(d['p95']['median'])} ms | {g} | {sp(x['ttft']['p50'])} | "
                f"{sp(x['added']['p50'])} | {sp(x['added']['p95'])} | {x['errors']} | {sp(x['foreign_cores'], 2)} |"
            )
    cpu = summ["20"]
    lines += [
        "",
        "CPU per 1,000 tokens delivered, by process, at 20 streams (median over rounds; ms of CPU):",
        "",
        "| process | under the floor | under sluice |",
        "|---|---:|---:|",
    ]
    roles = sorted(set(cpu["floor"]["cpu_ms_per_1k_tokens"]) | set(cpu["sluice"]["cpu_ms_per_1k_tokens"]))
    for side in ("floor", "sluice"):
        for role in [x for x in roles if x.startswith(side)]:
            val = cpu[side]["cpu_ms_per_1k_tokens"].get(role)
            lines.append(f"| {role} | {fmt(val) if side == 'floor' else ''} | {fmt(val) if side == 'sluice' else ''} |")
    lines.append(
        f"| **gateway total** | **{fmt(gateway_cpu(cpu['floor']['cpu_ms_per_1k_tokens'], 'floor'))}** | "
        f"**{fmt(gateway_cpu(cpu['sluice']['cpu_ms_per_1k_tokens'], 'sluice'))}** |"
    )
    for role in [x for x in roles if not x.startswith(GATEWAYS)]:
        lines.append(
            f"| {role} | {fmt(cpu['floor']['cpu_ms_per_1k_tokens'].get(role))} | {fmt(cpu['sluice']['cpu_ms_per_1k_tokens'].get(role))} |"
        )
    if "ladder" in base:
        lad = base["ladder"]
        lines += [
            "",
            f"Load ladder (added TTFT p95, median of the rounds; a gateway stops at its first level over "
            f"{ADDED_P95_LIMIT_MS:.0f} ms or with an error): largest passing load floor {lad['largest']['floor']}, "
            f"sluice {lad['largest']['sluice']}"
            + (
                f"; still passing at the top: {', '.join(lad['still_passing_at_top'])}"
                if lad["still_passing_at_top"]
                else ""
            )
            + ".",
            "",
            "| streams | upstream p95 | floor added p95 | sluice added p95 |",
            "|---:|---:|---|---|",
        ]
        for st in lad["steps"]:
            if st.get("cut_short"):
                lines.append(f"| {st['conc']} | — | out of time | out of time |")
                continue
            cells = []
            for g in GATEWAYS:
                x = st.get(g)
                cells.append(
                    "—"
                    if x is None
                    else f"{fmt(x['added_p95'])} ms{', ' + str(x['errors']) + ' errors' if x['errors'] else ''} {'✓' if x['pass'] else '✗'}"
                )
            lines.append(f"| {st['conc']} | {fmt(st['direct_p95'])} ms | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Idle memory (after the warm-up and " + f"{r['meta'].get('idle_s', 3):.0f} s idle), every process:",
        "",
        "| process | PSS MiB | RSS MiB |",
        "|---|---:|---:|",
    ]
    for p in base["idle"]["procs"]:
        lines.append(
            f"| {p['role']} (pid {p['pid']}) | {fmt((p['pss_kib'] or 0) / 1024)} | {fmt((p['rss_kib'] or 0) / 1024)} |"
        )
    for side, t in base["idle"]["totals"].items():
        lines.append(f"| **{side} total** ({t['procs']} processes) | **{t['pss_mib']:.1f}** | **{t['rss_mib']:.1f}** |")
    scaling = r["phases"].get("scaling")
    if scaling:
        lines += [
            "",
            "Scaling (SLUICE_WORKERS = SLUICE_POOLS = uvicorn --workers = n; largest load with added p95 ≤ 100 ms; "
            "idle PSS of each side):",
            "",
            "| n | sluice asked → ran (edges, Pools) | floor largest | sluice largest | floor idle PSS | sluice idle PSS |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for row in scaling["rows"]:
            t = row["idle"]["totals"]
            lines.append(
                f"| {row['n']} | {row['asked']['SLUICE_WORKERS']}/{row['asked']['SLUICE_POOLS']} → {row['ran']['edges']}/{row['ran']['pools']} | "
                f"{row['ladder']['largest']['floor']} | {row['ladder']['largest']['sluice']} | {t['floor']['pss_mib']:.0f} MiB | {t['sluice']['pss_mib']:.0f} MiB |"
            )
        rows = scaling["rows"]
        if any(
            r_["ran"]["edges"] < r_["asked"]["SLUICE_WORKERS"] or r_["ran"]["pools"] < r_["asked"]["SLUICE_POOLS"]
            for r_ in rows
        ):
            lines.append(
                "\nsluice ran fewer edges or Pools than asked (the knobs are not implemented yet): its figures at n > 1 "
                "are the same configuration measured again, so their differences are the noise between ladders."
            )
        if scaling.get("cut_short_at"):
            lines.append(f"\nOut of the time budget before n = {scaling['cut_short_at']}: not measured.")
        if len(rows) > 1:
            for side in ("floor", "sluice"):
                d = (rows[-1]["idle"]["totals"][side]["pss_mib"] - rows[0]["idle"]["totals"][side]["pss_mib"]) / max(
                    1, rows[-1]["n"] - rows[0]["n"]
                )
                lines.append(
                    f"\nEach added worker costs {side} {d:.1f} MiB PSS idle (n = {rows[0]['n']} → {rows[-1]['n']}"
                    + ("; the floor's 1 → 2 includes uvicorn's supervisor process)." if side == "floor" else ").")
                )
    lv = base.get("levels")
    if lv:
        lines += [
            "",
            f"Fixed levels, {lv['workers']} worker(s) each (added TTFT, median of rounds):",
            "",
            "| streams | floor added p50 / p95 | sluice added p50 / p95 | sluice errors |",
            "|---:|---|---|---:|",
        ]
        for row in lv["rows"]:
            lines.append(
                f"| {row['conc']} | {fmt(row['floor']['p50'])} / {fmt(row['floor']['p95'])} ms | "
                f"{fmt(row['sluice']['p50'])} / {fmt(row['sluice']['p95'])} ms | {row['sluice']['errors']} |"
            )
    lines += ["", HOW_TO_16, "", END]
    return "\n".join(lines) + "\n"


def write_doc(section: str, doc: Path = DOC) -> None:
    """Replace the marked section of docs/benchmarks.md (first time: after the LiteLLM
    summary, where bench.run_all puts it too)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        anchors = [a for a in ("\n## 1. Data plane", "\n## 5. Notes") if a in text]
        if anchors:
            text = text.replace(anchors[0], "\n" + section + anchors[0], 1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def kept_section(doc: Path = DOC) -> str:
    """The section as it stands in the doc (bench.run_all rewrites the rest around it)."""
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    return ""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv=None):
    cores = os.cpu_count() or 2
    p = argparse.ArgumentParser(prog="python -m bench.cores", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds, fewer samples, a shorter ladder (~2-3 min)")
    p.add_argument(
        "--device",
        action="store_true",
        help="the 16-core run in one command under 10 min: --scaling 1,2,4,8 --levels 100,200 --workers 6",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds of the TTFT measure (default 5; quick 3)")
    p.add_argument(
        "--workers", type=int, default=1, help="uvicorn --workers of the floor and SLUICE_WORKERS (baseline)"
    )
    p.add_argument("--pools", type=int, default=1, help="SLUICE_POOLS (baseline)")
    p.add_argument(
        "--ladder", type=_ints, help="load ladder, doubled past its end up to --max-streams (default 10,20,40,80)"
    )
    p.add_argument(
        "--max-streams", type=int, help=f"top of the ladder (default 160 on <= 4 cores, else 1280; here {cores})"
    )
    p.add_argument("--ladder-rounds", type=int, help="rounds per ladder step (default 2; quick 1)")
    p.add_argument("--no-ladder", action="store_true")
    p.add_argument("--scaling", type=_ints, default=[], help="worker counts to climb the ladder with, e.g. 1,2,4,8")
    p.add_argument("--levels", type=_ints, default=[], help="fixed loads compared at --workers each, e.g. 100,200")
    p.add_argument("--ttft-ms", type=float, default=200.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--upstream-procs", type=int, default=max(1, cores // 4))
    p.add_argument(
        "--upstream-http", choices=("h2c", "http1"), default="h2c", help="what sluice speaks to the upstream"
    )
    p.add_argument("--loadgens", type=int, default=0, help="load generator processes at most (default cores/4)")
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument(
        "--quiet-wait-s", type=float, help="longest wait for a quiet machine before a round (default 8; quick 5)"
    )
    p.add_argument(
        "--budget-s", type=float, help="stop starting new ladder steps after this many seconds (default 660; quick 180)"
    )
    p.add_argument("--json", help="results file (default bench/results/cores-<UTC time>.json)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the section of docs/benchmarks.md")
    p.add_argument(
        "--render", metavar="JSON", help="only rewrite the doc's section from a results file of an earlier run"
    )
    a = p.parse_args(argv)
    if a.device:
        # Issue 13's 16-core run, sized to fit one 10-minute command: scaling 1,2,4,8 (SLUICE_WORKERS =
        # SLUICE_POOLS = uvicorn --workers), 100 and 200 streams at 6 workers each, one round per ladder
        # step, no waiting for a quiet machine (a lent machine runs nothing else).
        a.scaling = a.scaling or [1, 2, 4, 8]
        a.levels = a.levels or [100, 200]
        a.workers = 6 if a.workers == 1 else a.workers
        a.pools = 6 if a.pools == 1 else a.pools
        a.no_ladder = True  # the scaling phase climbs the ladder for each worker count
        a.ladder = a.ladder or [20, 40, 80]
        a.ladder_rounds = a.ladder_rounds or 1
        a.quiet_wait_s = 0.0 if a.quiet_wait_s is None else a.quiet_wait_s
        a.budget_s = a.budget_s or 500.0
    small = a.quick or a.device
    a.rounds = a.rounds or (3 if a.quick else 5)
    a.ladder = a.ladder or [10, 20, 40, 80]
    a.max_streams = a.max_streams or ((80 if a.quick else 160) if cores <= 4 else 1280)
    a.ladder_rounds = a.ladder_rounds or (1 if a.quick else 2)
    a.budget_s = a.budget_s or (180.0 if a.quick else 660.0)
    a.quiet_wait_s = a.quiet_wait_s if a.quiet_wait_s is not None else (5.0 if a.quick else 8.0)
    a.samples_1 = 4 if small else 6  # streams per round at 1 stream (plus one warm-up)
    a.samples_20 = 2 if small else 3  # per worker at 20 streams: 40 or 60 samples a round
    return a


def main(argv=None) -> int:
    args = parse(argv)
    if args.render:
        import json

        write_doc(render(json.loads(Path(args.render).read_text())))
        log(f"wrote the section of {DOC.relative_to(ROOT)} from {args.render}")
        return 0
    raise_nofile(65536)
    bench = Bench(args)
    with sigterm_as_interrupt():
        try:
            results = bench.run()
        except KeyboardInterrupt:
            log("interrupted; nothing written")
            return 130
        finally:
            bench.stop()
    results["meta"]["idle_s"] = args.idle_s
    path = args.json or str(RESULTS / f"cores-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json")
    write_json(path, results)
    log(f"wrote {path}")
    for v in verdicts(results):
        log(f"  {'info' if v['pass'] is None else 'PASS' if v['pass'] else 'FAIL'}: {v['target']}: {v['value']}")
    if not args.no_doc:
        write_doc(render(results))
        log(f"wrote the section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
