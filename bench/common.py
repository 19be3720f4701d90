"""Helpers shared by the benchmarks: statistics, /proc readings, cleanup, machine facts.

Everything here reads /proc directly (no psutil). Times are `time.monotonic()` unless a
name says otherwise; CLOCK_MONOTONIC is system-wide on Linux, so producer and consumer
timestamps taken in different processes are comparable.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from actors.system import alive, cmdline, descendants, process_table  # noqa: F401  (the benches use them)

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- statistics ------------------------------------------------------------------------------
def pct(values, q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values) -> float | None:
    data = [v for v in values if v is not None]
    return statistics.median(data) if data else None


def spread(values) -> dict:
    """min / median / max of per-round figures: the noise, written down."""
    data = [v for v in values if v is not None]
    if not data:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(data), "median": statistics.median(data), "max": max(data), "n": len(data)}


def fmt(value, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}{unit}"


# --- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0  # a zombie has no VmRSS line


def pss_kib(pid: int) -> int | None:
    """Proportional set size (shared pages split between the processes sharing them)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def system_cpu_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def kill_pids(pids, sig=signal.SIGKILL) -> None:
    """Kill exactly these processes (ours, by id) if they are still alive."""
    for pid in pids:
        if pid != os.getpid() and alive(pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


# --- sockets ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- signals ----------------------------------------------------------------------------------
@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so `finally:` blocks clean up on both."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- machine facts ----------------------------------------------------------------------------
def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for name in ("thespian", "msgpack", "starlette", "uvicorn", "httpcore", "h2", "h11", "anyio"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_mib": mem_kib // 1024 if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit,
        "git_dirty_files": len(dirty.splitlines()) if dirty else 0,
        "loadavg_at_start": loadavg(),
        "ulimit_nofile": _nofile(),
    }


def _nofile():
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile(want: int) -> int:
    """Raise the soft open-files limit towards `want` (within the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard if hard != resource.RLIM_INFINITY else want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def write_json(path: str | None, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    else:
        print(text)


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def busy_pct(window_s: float = 1.0) -> float:
    """How busy the whole machine is right now: % of all cores, over `window_s`."""
    b0, t0 = system_cpu_busy()
    time.sleep(window_s)
    b1, t1 = system_cpu_busy()
    return (b1 - b0) / max(1, t1 - t0) * 100.0


def wait_for_quiet(max_busy_pct: float = 35.0, max_wait_s: float = 90.0, window_s: float = 1.0) -> dict:
    """Other people run tests on this machine: before a measurement, wait (bounded) until
    the machine is below `max_busy_pct` % busy over `window_s`. Returns what was seen."""
    t0 = time.monotonic()
    seen = busy_pct(window_s)
    while seen > max_busy_pct and time.monotonic() - t0 < max_wait_s:
        seen = busy_pct(window_s)
    return {"busy_pct": round(seen, 1), "waited_s": round(time.monotonic() - t0, 1), "quiet": seen <= max_busy_pct}


def tree_cpu(pids) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)
