"""Where does sluice spend its time? CPU per process and (optionally) py-spy stacks under
the gateway benchmark's load.

    .venv/bin/python -m bench.profile [--scenario steady|burst] [--seconds 15] [--py-spy] [--json out.json]

Starts the sim and sluice as bench.gateway does, names every process of run.py's tree by
its role (the Supervisor's directory maps roles to actor addresses; /proc maps listening
ports to processes), drives the load, and reports per process: CPU seconds and CPU ms
per stream (from /proc), and with --py-spy (`pip install py-spy` into the venv; sampled
with --nonblocking at --rate Hz, so the targets are not paused) the functions that take
the most samples, self and inclusive. The sim and this load generator are measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from bench.common import ROOT, cmdline, cpu_seconds, log, sigterm_as_interrupt, write_json
from bench.load import GatewayProc, Sim, new_pool, sim_prompt, stream_once

KNOBS = {"ttft_ms": 200, "token_interval_ms": 20, "tokens": 10}
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*):?(?P<line>\d*)\)$")


def roles_of(gw: GatewayProc) -> dict[int, str]:
    """pid -> role, by matching the directory's actor ports with each process's listening sockets."""
    sys.path.insert(0, str(ROOT))
    from sim.testing import listening_ports

    out: dict[int, str] = {}
    pids = gw.pids()
    try:
        code = (
            "import json,os,sys\n"
            "from actors import system\n"
            "system.prepare('127.0.0.1', os.environ['SLUICE_CLUSTER_SECRET'].encode())\n"
            "from edge.bridge import ActorBridge\n"
            f"b = ActorBridge({gw.gw.actor_port}, workers=1)\n"
            "b.start()\n"
            "d = b.refresh_directory_blocking()\n"
            "print(json.dumps({'entries': d.entries, 'hub': d.hub}))\n"
            "b.close()\n"
        )
        # A separate short-lived process joins the actor system, so this one stays clean.
        env = {**os.environ, "SLUICE_CLUSTER_SECRET": gw.gw.cluster_secret()}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
        )
        import json

        directory = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:
        log("could not read the directory:", exc)
        directory = {"entries": {}, "hub": []}
    by_port = {int(addr.rpartition(":")[2]): role for role, addr in directory["entries"].items()}
    for pid in pids:
        ports = {port for _, port in listening_ports({pid})}
        names = sorted(by_port[p] for p in ports if p in by_port)
        if names:
            out[pid] = "+".join(names)
        elif pid == gw.gw.proc.pid:
            out[pid] = "edge (run.py: uvicorn)"
        elif gw.gw.actor_port in ports:
            out[pid] = "thespian admin"  # it also writes the log lines (patches/thespian_admin_logs.py)
        else:
            out[pid] = "other: " + cmdline(pid)[:60]
    return out


async def steady(gw_url: str, concurrency: int, seconds: float) -> int:
    """`concurrency` closed-loop workers of distinct streams for `seconds`; returns streams done."""
    period = (KNOBS["ttft_ms"] + KNOBS["tokens"] * KNOBS["token_interval_ms"]) / 1000.0
    pool = new_pool(concurrency + 2)
    done = 0
    stop_at = time.monotonic() + seconds
    tag = uuid.uuid4().hex[:6]

    async def worker(j):
        nonlocal done
        await asyncio.sleep(j * period / concurrency)
        i = 0
        while time.monotonic() < stop_at:
            await stream_once(pool, "sluice", gw_url + "/api/chat", sim_prompt(f"prof-{tag}-{j}-{i}", **KNOBS))
            done += 1
            i += 1

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(j) for j in range(concurrency))), seconds + 60)
    finally:
        await pool.aclose()
    return done


async def burst(gw_url: str, n: int, rounds: int) -> int:
    pool = new_pool(n + 2)
    try:
        for _ in range(rounds):
            prompt = sim_prompt(f"prof-burst-{uuid.uuid4().hex[:6]}", ttft_ms=2000, token_interval_ms=20, tokens=20)
            await asyncio.wait_for(
                asyncio.gather(*(stream_once(pool, "sluice", gw_url + "/api/chat", prompt) for _ in range(n))), 60
            )
    finally:
        await pool.aclose()
    return n * rounds


def parse_raw(path: str) -> tuple[int, collections.Counter, collections.Counter]:
    """py-spy --format raw: 'frame;frame;...;leaf count' -> (samples, self, inclusive)."""
    total, own, incl = 0, collections.Counter(), collections.Counter()
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return 0, own, incl
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";") if f]
        # A forked actor's main thread still shows its parents' frames down to the fork;
        # keep only what runs after multiprocessing's `_bootstrap` in the child.
        cut = max((i for i, f in enumerate(frames) if f.startswith("BaseProcess._bootstrap")), default=-1)
        frames = frames[cut + 1 :]
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({file}:{m.group('line')})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("steady", "burst"), default="steady")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--burst-rounds", type=int, default=3)
    parser.add_argument("--py-spy", action="store_true")
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the gateway")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if args.py_spy and not pyspy:
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    out_dir = tempfile.mkdtemp(prefix="sluice-profile-")
    sim, gw, spies = Sim(), None, []
    result = {"params": vars(args), "processes": []}
    with sigterm_as_interrupt():
        try:
            sim.start()
            env = {"SIMULATED_BASE_URL": sim.url, **dict(e.split("=", 1) for e in args.env)}
            gw = GatewayProc(env).start()
            asyncio.run(steady(gw.url, 4, 2.0))  # warm-up
            roles = roles_of(gw)
            roles[sim.proc.pid] = "sim provider"
            roles[os.getpid()] = "load generator"
            duration = args.seconds if args.scenario == "steady" else 10.0
            if args.py_spy:
                for pid in roles:
                    if pid == os.getpid():
                        continue
                    path = os.path.join(out_dir, f"{pid}.txt")
                    spies.append(
                        (
                            pid,
                            path,
                            subprocess.Popen(
                                [
                                    pyspy,
                                    "record",
                                    "--pid",
                                    str(pid),
                                    "--format",
                                    "raw",
                                    "--output",
                                    path,
                                    "--rate",
                                    str(args.rate),
                                    "--nonblocking",
                                    "--gil",
                                    "--duration",
                                    str(int(duration + 5)),
                                ],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                            ),
                        )
                    )
                time.sleep(1.0)
            cpu0 = {pid: cpu_seconds(pid) for pid in roles}
            p0 = time.process_time()
            t0 = time.monotonic()
            if args.scenario == "steady":
                streams = asyncio.run(steady(gw.url, args.concurrency, args.seconds))
            else:
                streams = asyncio.run(burst(gw.url, args.burst, args.burst_rounds))
            wall = time.monotonic() - t0
            cpu1 = {pid: cpu_seconds(pid) for pid in roles}
            cpu0[os.getpid()], cpu1[os.getpid()] = p0, time.process_time()
            for _, _, proc in spies:
                try:
                    proc.wait(timeout=duration + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            result.update({"streams": streams, "wall_s": wall})
            for pid, role in sorted(roles.items(), key=lambda kv: -((cpu1.get(kv[0]) or 0) - (cpu0.get(kv[0]) or 0))):
                used = (cpu1.get(pid) or 0) - (cpu0.get(pid) or 0)
                entry = {
                    "pid": pid,
                    "role": role,
                    "cpu_s": used,
                    "cpu_pct": used / wall * 100.0,
                    "cpu_ms_per_stream": used / max(streams, 1) * 1000.0,
                }
                path = os.path.join(out_dir, f"{pid}.txt")
                if args.py_spy and os.path.exists(path):
                    total, own, incl = parse_raw(path)
                    entry["samples"] = total
                    # Samples give the shares; the process's CPU time from /proc gives the scale (GIL-held samples
                    # over-count on a loaded machine: a thread can hold the GIL while descheduled).
                    per = entry["cpu_ms_per_stream"] / total if total else 0.0
                    entry["top_self"] = (
                        [(f, n, round(n / total * 100, 1), round(n * per, 3)) for f, n in own.most_common(args.top)]
                        if total
                        else []
                    )
                    sluice = [(f, n) for f, n in incl.most_common() if re.search(r"\((actors|edge|protocols|sim)/", f)]
                    entry["top_inclusive_sluice"] = (
                        [(f, n, round(n / total * 100, 1), round(n * per, 3)) for f, n in sluice[: args.top]]
                        if total
                        else []
                    )
                    entry["top_inclusive"] = (
                        [
                            (f, n, round(n / total * 100, 1), round(n * per, 3))
                            for f, n in incl.most_common(args.top * 3)
                        ]
                        if total
                        else []
                    )
                result["processes"].append(entry)
        finally:
            for _, _, proc in spies:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if gw is not None:
                gw.stop()
            sim.stop()
    result["raw_dir"] = out_dir if args.py_spy else None
    write_json(args.json, result)
    print(render(result))
    return result


def render(r: dict) -> str:
    lines = [
        f"{r['streams']} streams in {r['wall_s']:.1f} s ({r['params']['scenario']})",
        "",
        "| process | CPU s | % of a core | CPU ms per stream |",
        "|---|---:|---:|---:|",
    ]
    for p in r["processes"]:
        lines.append(
            f"| {p['role']} ({p['pid']}) | {p['cpu_s']:.2f} | {p['cpu_pct']:.0f} | {p['cpu_ms_per_stream']:.2f} |"
        )
    for p in r["processes"]:
        if p.get("top_self"):
            lines += [
                "",
                f"### {p['role']} — {p['samples']} GIL-held samples; {p['cpu_ms_per_stream']:.2f} CPU ms per stream shared out by samples",
                "self:",
            ]
            lines += [f"  {pct:5.1f}%  {ms:6.2f} ms/stream  {f}" for f, n, pct, ms in p["top_self"]]
            lines += ["inclusive (sluice code):"]
            lines += [f"  {pct:5.1f}%  {ms:6.2f} ms/stream  {f}" for f, n, pct, ms in p["top_inclusive_sluice"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
