"""Side-by-side benchmark: sluice vs LiteLLM proxy vs the direct (simulated) upstream.

    .venv/bin/python -m bench.litellm_compare           # the full run (~25-35 min on 2 cores)
    .venv/bin/python -m bench.litellm_compare --quick   # a short run (~6-8 min)

What it does, in order (progress is printed as it goes):
  1. installs LiteLLM proxy into its own virtualenv, bench/.peers/litellm-venv (git-ignored;
     a benchmark peer, not a sluice dependency), unless it is there already, and matplotlib
     into sluice's venv (`pip install -e '.[bench]'`) if it is missing;
  2. starts the simulated provider, sluice (run.py via sim.testing.Gateway, generous
     pacer) and LiteLLM (`litellm --config ... --num_workers 1`);
  3. drives the same load at each of them, interleaved (targets rotate order every round),
     with bench/litellm_loadgen.py in a process of its own whose CPU is measured;
  4. measures: added TTFT and inter-token gap vs concurrency, the highest sustained
     concurrency, cancel latency, bursts of identical requests (with a second sluice at
     production pacer settings), CPU per 1,000 streamed tokens and peak memory;
  5. writes docs/benchmarks-litellm.md, docs/img/litellm-*.png and the raw numbers to
     bench/results/ (git-ignored); and stops every process it started (also on Ctrl-C).

The hand-written analysis in docs/benchmarks-litellm.md between the markers
`<!-- analysis:begin -->` and `<!-- analysis:end -->` survives a re-run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sim.testing import Gateway, alive, descendants, free_port, request  # noqa: E402

PEERS = ROOT / "bench" / ".peers"
LITELLM_VENV = PEERS / "litellm-venv"
# Pinned: litellm 1.82.7 and 1.82.8 on PyPI were a supply-chain compromise (credential
# stealer, March 2026); 1.82.6 is the last release before it that was widely audited.
# Override with --litellm-spec; the versions below are refused whatever the spec says.
DEFAULT_LITELLM_SPEC = "litellm[proxy]==1.82.6"
REFUSED_LITELLM_VERSIONS = {"1.82.7", "1.82.8", "1.107.0"}
DOC = ROOT / "docs" / "benchmarks-litellm.md"
IMG = ROOT / "docs" / "img"
RESULTS = ROOT / "bench" / "results"

LITELLM_COMMAND_SHOWN = "litellm --config <config.yaml> --host 127.0.0.1 --port <free port> --num_workers 1"
IDLE_WINDOW_S = 5.0
SIM_TTFT_MS = 200
SIM_INTERVAL_MS = 20
SIM_TOKENS = 30
TARGETS = ("direct", "sluice", "litellm")
GATEWAYS = ("sluice", "litellm")

T_START = time.monotonic()


def log(msg: str) -> None:
    el = time.monotonic() - T_START
    print(f"[{int(el // 60):3d}:{int(el % 60):02d}] {msg}", flush=True)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ----------------------------------------------------------------------------- install


def pip_version(python: Path, dist: str) -> str | None:
    out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401

        log(f"matplotlib {matplotlib.__version__} present in sluice's venv")
    except ImportError:
        log("installing matplotlib into sluice's venv: pip install -e '.[bench]'")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", ".[bench]"], cwd=ROOT, check=True)


def _suspicious_pth(venv: Path) -> list[str]:
    """.pth files run code at every interpreter start: the 1.82.8 compromise hid there."""
    allowed = {"distutils-precedence.pth", "_virtualenv.pth"}
    found = []
    for sp in venv.glob("lib/python*/site-packages"):
        for pth in sp.glob("*.pth"):
            if pth.name not in allowed and not pth.name.startswith("__editable__"):
                found.append(str(pth))
    return found


def ensure_litellm(spec: str) -> str:
    python = LITELLM_VENV / "bin" / "python"
    version = pip_version(python, "litellm") if python.exists() else None
    if version and (LITELLM_VENV / "bin" / "litellm").exists():
        log(f"LiteLLM {version} already installed in {LITELLM_VENV.relative_to(ROOT)} (skipping install)")
    else:
        PEERS.mkdir(parents=True, exist_ok=True)
        if not python.exists():
            log(f"creating {LITELLM_VENV.relative_to(ROOT)}")
            subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        log(f"installing {spec!r} into {LITELLM_VENV.relative_to(ROOT)} (a benchmark peer, not a sluice dependency)")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", spec], check=True)
        version = pip_version(python, "litellm")
        log(f"installed LiteLLM {version}")
    if version in REFUSED_LITELLM_VERSIONS:
        raise SystemExit(f"LiteLLM {version} is a known-compromised release; refusing to run it")
    bad = _suspicious_pth(LITELLM_VENV)
    if bad:
        raise SystemExit(f"unexpected .pth files in the LiteLLM venv (code that runs at start): {bad}")
    return version


# ----------------------------------------------------------------------------- processes


def proc_tree(root_pid: int) -> set[int]:
    return ({root_pid} | descendants(root_pid)) if alive(root_pid) else descendants(root_pid)


def cpu_seconds(pids: set[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def system_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle
    return busy / os.sysconf("SC_CLK_TCK")


def foreign_cores(ours, seconds: float = 1.0) -> float:
    pids = ours()
    a, b = system_cpu_seconds(), cpu_seconds(pids)
    time.sleep(seconds)
    pids |= ours()
    return max(0.0, ((system_cpu_seconds() - a) - (cpu_seconds(pids) - b)) / seconds)


def rss_kib(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def pss_kib(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class Sim:
    def __init__(self):
        from sim.provider import start_subprocess

        self.proc, self.port = start_subprocess()
        self.url = f"http://127.0.0.1:{self.port}"

    def configure(self, **knobs) -> None:
        status, _, body = request("POST", self.url + "/config", knobs)
        assert status == 200, body

    def stats(self) -> dict:
        status, _, body = request("GET", self.url + "/stats", timeout=30)
        assert status == 200, body
        return json.loads(body)

    def wait_idle(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["streams_open"] == 0:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        from sim.provider import stop_subprocess

        stop_subprocess(self.proc)


class Sluice:
    def __init__(self, name: str, sim_url: str, rps: str, burst: str, conc: str):
        self.name = name
        self.gw = Gateway({"SIMULATED_BASE_URL": sim_url, "SIMULATED_RPS": rps, "SIMULATED_BURST": burst,
                           "SIMULATED_CONCURRENCY": conc, "SLUICE_LOG_LEVEL": "WARNING",
                           "SLUICE_MAX_CONNECTIONS_PER_CLIENT": "0"})  # one loopback load generator
        self.pacer = f"RPS={rps} BURST={burst} CONCURRENCY={conc}"

    def start(self) -> Sluice:
        self.gw.start(timeout=60)
        return self

    @property
    def pids(self) -> set[int]:
        return proc_tree(self.gw.proc.pid) if self.gw.proc else set()

    def target(self) -> dict:
        return {"name": self.name, "host": "127.0.0.1", "port": self.gw.port, "path": "/api/chat", "format": "sluice"}

    def stop(self) -> None:
        try:
            self.gw.stop()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.gw.leftovers() != (set(), set()):
                time.sleep(0.1)
        finally:
            self.gw.kill_leftovers()


class LiteLLM:
    def __init__(self, sim_url: str):
        self.tmp = tempfile.mkdtemp(prefix="bench-litellm-")
        self.key = "sk-" + secrets.token_hex(16)
        self.port = free_port()
        self.config = os.path.join(self.tmp, "litellm.yaml")
        with open(self.config, "w") as f:
            f.write(
                "model_list:\n"
                "  - model_name: sim-1\n"
                "    litellm_params:\n"
                "      model: openai/sim-1\n"
                f"      api_base: {sim_url}/v1\n"
                "      api_key: sk-sim-not-a-real-key\n"
                "litellm_settings:\n"
                "  num_retries: 0\n"
                "general_settings:\n"
                f"  master_key: {self.key}\n"
            )
        self.proc: subprocess.Popen | None = None
        self.tree: set[int] = set()
        self.log_path = os.path.join(self.tmp, "litellm.log")

    @property
    def command(self) -> list[str]:
        return [str(LITELLM_VENV / "bin" / "litellm"), "--config", self.config, "--host", "127.0.0.1",
                "--port", str(self.port), "--num_workers", "1"]

    def start(self, timeout: float = 180.0) -> LiteLLM:
        # A scrubbed environment: the peer sees no credentials of this machine, has a HOME of its
        # own, and uses its bundled model-cost map instead of fetching one.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.tmp, "TMPDIR": self.tmp,
               "LANG": "C.UTF-8", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.tmp, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _, _ = request("GET", f"http://127.0.0.1:{self.port}/health/liveliness", timeout=2)
                if status == 200:
                    self.tree = self.pids
                    return self
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"litellm not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def pids(self) -> set[int]:
        return proc_tree(self.proc.pid) if self.proc else set()

    def target(self) -> dict:
        return {"name": "litellm", "host": "127.0.0.1", "port": self.port, "path": "/v1/chat/completions",
                "format": "openai", "model": "sim-1", "headers": {"Authorization": f"Bearer {self.key}"}}

    def stop(self) -> None:
        if self.proc is None:
            return
        self.tree |= self.pids
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.tree:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def direct_target(sim: Sim) -> dict:
    return {"name": "direct", "host": "127.0.0.1", "port": sim.port, "path": "/v1/chat/completions",
            "format": "openai", "model": "sim-1"}


class MemSampler(threading.Thread):
    """Samples RSS (and, less often, PSS) of each process tree: peak of the tree's sum."""

    def __init__(self, sources: dict, interval: float = 0.25):
        super().__init__(daemon=True)
        self.sources = sources  # name -> callable returning the pid set
        self.interval = interval
        self.peak_rss: dict[str, int] = {}
        self.peak_pss: dict[str, int] = {}
        self.nprocs: dict[str, int] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        trees: dict[str, set[int]] = {}
        while not self.stop_event.wait(self.interval):
            n += 1
            for name, get in list(self.sources.items()):
                try:
                    if n % 20 == 1 or not trees.get(name) or not all(alive(p) for p in trees[name]):
                        trees[name] = get()  # a /proc scan: every 5 s or when the tree changed
                    pids = trees[name]
                except Exception:
                    continue
                if not pids:
                    continue
                self.nprocs[name] = max(self.nprocs.get(name, 0), len(pids))
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss_kib(pids))
                if n % 4 == 0:
                    self.peak_pss[name] = max(self.peak_pss.get(name, 0), pss_kib(pids))


# ----------------------------------------------------------------------------- load


LOADGENS: set[subprocess.Popen] = set()


def run_cell(spec: dict, hard_timeout: float) -> dict:
    """Run one load cell in a loadgen process of its own; returns its JSON result."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.litellm_loadgen"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    LOADGENS.add(proc)
    try:
        out, err = proc.communicate(json.dumps(spec).encode(), timeout=hard_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"loadgen cell exceeded {hard_timeout}s: {spec['target']['name']}") from None
    finally:
        LOADGENS.discard(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return json.loads(out)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize_streams(result: dict, upstream: dict | None = None) -> dict:
    """`upstream`: first prompt line -> the simulator's record of that call (started_at,
    first_byte_at), to split TTFT into admission (client start -> upstream receives the
    call) and delivery (upstream's first byte -> the client reads the first token)."""
    recs = result["records"]
    measured = [r for r in recs if not r.get("warmup")]
    ok = [r for r in measured if r["ok"] and r["ttft"] is not None]
    ttft_ms = [r["ttft"] * 1000 for r in ok]
    admission, delivery, edge_in, actor_path = [], [], [], []
    for r in ok:
        call = (upstream or {}).get(r["text"].split("\n")[0])
        if call and call.get("started_at") and call.get("first_byte_at"):
            admission.append((call["started_at"] - r["t0"]) * 1000)
            delivery.append(r["ttft"] * 1000 - (call["first_byte_at"] - r["t0"]) * 1000)
            if r.get("gw_ttft_ms") is not None:
                # sluice's meta ttft_ms = Pool's first byte - edge's received_at, so (taking the
                # Pool's first byte ~ the simulator's) the edge received the request at:
                received = call["first_byte_at"] - r["gw_ttft_ms"] / 1000
                edge_in.append((received - r["t0"]) * 1000)
                actor_path.append((call["started_at"] - received) * 1000)
    gaps = []
    for r in ok:
        t = r["tok"]
        gaps.extend((b - a) * 1000 for a, b in zip(t, t[1:]))
    errors: dict[str, int] = {}
    for r in recs:
        if not r["ok"]:
            errors[r["error"] or "unknown"] = errors.get(r["error"] or "unknown", 0) + 1
    return {
        "n": len(measured), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": errors,
        "ttft_p50": pct(ttft_ms, 50), "ttft_p95": pct(ttft_ms, 95), "ttft_p99": pct(ttft_ms, 99),
        "gap_p50": pct(gaps, 50), "gap_p95": pct(gaps, 95), "gap_p99": pct(gaps, 99),
        "admission_p50": pct(admission, 50), "admission_p95": pct(admission, 95),
        "delivery_p50": pct(delivery, 50), "delivery_p95": pct(delivery, 95), "matched": len(admission),
        "edge_in_p50": pct(edge_in, 50), "edge_in_p95": pct(edge_in, 95),
        "actor_path_p50": pct(actor_path, 50), "actor_path_p95": pct(actor_path, 95),
        "gw_ttft_p50": pct([r["gw_ttft_ms"] for r in ok if r.get("gw_ttft_ms") is not None], 50),
        "gw_queue_p95": pct([r["gw_queue_ms"] for r in ok if r.get("gw_queue_ms") is not None], 95),
        "tokens": sum(r["ntok"] for r in recs), "wall_s": result["wall_s"], "loadgen_cpu_s": result["loadgen_cpu_s"],
        "error_details": sorted({str(r.get("detail"))[:160] for r in recs if not r["ok"] and r.get("detail")})[:3],
    }


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.sim: Sim | None = None
        self.sluice: Sluice | None = None
        self.sluice_prod: Sluice | None = None
        self.litellm: LiteLLM | None = None
        self.sampler: MemSampler | None = None
        self.results: dict = {"meta": {}, "streams": [], "sustain": [], "cancel": [], "burst": [], "idle": {}}

    # --- lifecycle
    def start(self) -> None:
        soft, hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
        if soft < min(hard, 16384):
            __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (min(hard, 16384), hard))
        log("starting the simulated provider")
        self.sim = Sim()
        self.sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=SIM_INTERVAL_MS, tokens=SIM_TOKENS)
        log(f"sim on {self.sim.url} (ttft {SIM_TTFT_MS} ms, a token every {SIM_INTERVAL_MS} ms, {SIM_TOKENS} tokens)")
        log("starting sluice (generous pacer: RPS=1000 BURST=1000 CONCURRENCY=1000)")
        self.sluice = Sluice("sluice", self.sim.url, "1000", "1000", "1000").start()
        log(f"sluice on {self.sluice.gw.url} ({len(self.sluice.pids)} processes)")
        log("starting LiteLLM proxy (--num_workers 1)")
        self.litellm = LiteLLM(self.sim.url).start()
        log(f"LiteLLM on http://127.0.0.1:{self.litellm.port} ({len(self.litellm.pids)} processes)")
        self.sampler = MemSampler({"sluice": lambda: self.sluice.pids if self.sluice else set(),
                                   "sluice_prod": lambda: self.sluice_prod.pids if self.sluice_prod else set(),
                                   "litellm": lambda: self.litellm.pids if self.litellm else set(),
                                   "sim": lambda: proc_tree(self.sim.proc.pid) if self.sim else set()})
        self.sampler.start()

    def stop(self) -> None:
        if self.sampler:
            self.sampler.stop_event.set()
        for proc in list(LOADGENS):
            if proc.poll() is None:
                proc.kill()
        for name, thing in (("sluice (production pacer)", self.sluice_prod), ("sluice", self.sluice),
                            ("LiteLLM", self.litellm), ("sim", self.sim)):
            if thing is None:
                continue
            try:
                log(f"stopping {name}")
                thing.stop()
            except Exception as exc:  # keep stopping the others
                log(f"  stopping {name} failed: {exc!r}")

    def targets(self) -> dict[str, dict]:
        return {"direct": direct_target(self.sim), "sluice": self.sluice.target(), "litellm": self.litellm.target()}

    def gateway_pids(self, name: str) -> set[int]:
        if name == "sluice":
            return self.sluice.pids
        if name == "litellm":
            return self.litellm.pids
        if name == "sluice_prod":
            return self.sluice_prod.pids
        return proc_tree(self.sim.proc.pid)

    def all_our_pids(self) -> set[int]:
        pids = proc_tree(self.sim.proc.pid)
        for thing in (self.sluice, self.sluice_prod, self.litellm):
            if thing is not None:
                pids |= thing.pids
        return pids

    def wait_quiet(self, label: str) -> None:
        """Before a round: wait (bounded) until other work on the machine uses < 0.5 core."""
        limit = self.args.quiet_wait
        waited, f = 0.0, foreign_cores(self.all_our_pids)
        while f > 0.5 and waited < limit:
            if waited == 0:
                log(f"  {label}: other processes use {f:.1f} cores; waiting up to {limit:.0f} s for a quieter machine")
            f = foreign_cores(self.all_our_pids, 2.0)
            waited += 2.0
        self.results.setdefault("quiet", []).append({"label": label, "waited_s": waited, "foreign_cores": f})

    @staticmethod
    def order(round_no: int, names=TARGETS) -> list[str]:
        k = round_no % len(names)
        return list(names[k:]) + list(names[:k])

    def stream_cell(self, name: str, target: dict, conc: int, per_worker: int, warmup: int, nonce: str,
                    prompt: str = "", identical: bool = False, stagger: float | None = None,
                    timeout_s: float = 30.0, cancel_after: int | None = None, breakdown: bool = False) -> dict:
        target = self.current_target(name, target)
        stream_s = (SIM_TTFT_MS + SIM_INTERVAL_MS * SIM_TOKENS) / 1000
        spec = {"target": target, "concurrency": conc, "per_worker": per_worker, "warmup": warmup,
                "stagger_s": stream_s if stagger is None else stagger, "timeout_s": timeout_s, "nonce": nonce,
                "prompt": prompt, "identical": identical, "cancel_after_tokens": cancel_after}
        gw_key = name if name != "direct" else "sim"
        pids = self.gateway_pids(gw_key)
        sim_pids = proc_tree(self.sim.proc.pid)
        ours = self.all_our_pids()
        cpu0, sim0, ours0, sys0 = cpu_seconds(pids), cpu_seconds(sim_pids), cpu_seconds(ours), system_cpu_seconds()
        w0 = time.monotonic()
        calls0 = self.sim.stats()["calls"]
        load0 = os.getloadavg()[0]
        res = run_cell(spec, hard_timeout=timeout_s * per_worker + 120)
        pids |= self.gateway_pids(gw_key)
        cpu1, sim1, ours1, sys1 = cpu_seconds(pids), cpu_seconds(sim_pids), cpu_seconds(ours), system_cpu_seconds()
        w1 = time.monotonic()
        stats = self.sim.stats()
        upstream = {}
        if breakdown:
            for req in stats["requests"]:
                try:
                    upstream[req["body"]["messages"][-1]["content"].split("\n")[0]] = req
                except (KeyError, IndexError, TypeError, AttributeError):
                    pass
        s = summarize_streams(res, upstream)
        # CPU used on the machine by anything but our gateways, the simulator and the loadgen:
        # the other engineers' test runs. Cores, averaged over the cell.
        foreign = ((sys1 - sys0) - (ours1 - ours0) - res["loadgen_cpu_s"]) / max(w1 - w0, 1e-6)
        s.update({"target": name, "conc": conc, "gw_cpu_s": cpu1 - cpu0, "sim_cpu_s": sim1 - sim0,
                  "upstream_calls": stats["calls"] - calls0, "loadavg": load0, "foreign_cores": max(0.0, foreign)})
        s["_records"] = res["records"]
        if name != "direct" and res["records"] and s["errors"] * 2 >= len(res["records"]):
            self.check_health(name, s, nonce)
        return s

    def current_target(self, name: str, fallback: dict) -> dict:
        """A gateway restarted after an incident listens on a new port: always ask the live one."""
        thing = {"sluice": self.sluice, "sluice_prod": self.sluice_prod, "litellm": self.litellm}.get(name)
        return thing.target() if thing is not None else fallback

    def check_health(self, name: str, cell: dict, nonce: str) -> None:
        """Half or more of a cell failed: probe the gateway with one plain request; if that fails
        too, record an incident (with the gateway's own state and log) and restart it."""
        target = self.current_target(name, {})
        probe = run_cell({"target": target, "concurrency": 1, "per_worker": 1, "timeout_s": 20, "nonce": "probe"}, 60)
        ok = probe["records"][0]["ok"]
        incident = {"target": name, "cell": nonce, "conc": cell["conc"], "errors": cell["errors"],
                    "error_kinds": cell["error_kinds"], "details": cell["error_details"], "probe_ok": ok,
                    "at": datetime.now(UTC).strftime("%H:%M:%S UTC")}
        if name.startswith("sluice"):
            gw = (self.sluice if name == "sluice" else self.sluice_prod).gw
            try:
                status, _, body = request("GET", gw.url + "/api/metrics/performance?last_n=100", timeout=10)
                incident["metrics"] = json.loads(body) if status == 200 else body[:300].decode(errors="replace")
            except Exception as exc:
                incident["metrics"] = repr(exc)
            incident["log_tail"] = gw.output()[-1500:]
        else:
            incident["log_tail"] = self.litellm.output()[-1500:]
        log(f"  INCIDENT: {name} failed {cell['errors']} of its streams in cell {nonce} ({cell['error_kinds']}); "
            f"a probe request {'succeeded' if ok else 'failed too'}")
        if not ok:
            log(f"  restarting {name} so the remaining measures can run (recorded in the report)")
            if name == "litellm":
                self.litellm.stop()
                self.litellm = LiteLLM(self.sim.url).start()
            else:
                old = self.sluice if name == "sluice" else self.sluice_prod
                old.stop()
                env = old.gw.env
                fresh = Sluice(name, self.sim.url, env["SIMULATED_RPS"], env["SIMULATED_BURST"],
                               env["SIMULATED_CONCURRENCY"]).start()
                if name == "sluice":
                    self.sluice = fresh
                else:
                    self.sluice_prod = fresh
            incident["restarted"] = True
        self.results.setdefault("incidents", []).append(incident)

    def warmup(self) -> None:
        log("warm-up: 2 x 5 streams per target")
        for name, t in self.targets().items():
            for i in range(2):
                s = self.stream_cell(name, t, 5, 1, 0, f"warm{i}")
                if s["errors"]:
                    log(f"  warm-up {name}: {s['errors']} errors {s['error_kinds']} {s['error_details']}")
        trees = {name: self.gateway_pids(name) for name in GATEWAYS}
        before = {name: cpu_seconds(pids) for name, pids in trees.items()}
        time.sleep(IDLE_WINDOW_S)
        for name, pids in trees.items():
            self.results["idle"][name] = {"rss_kib": rss_kib(pids), "pss_kib": pss_kib(pids), "procs": len(pids),
                                          "cpu_cores": (cpu_seconds(pids) - before[name]) / IDLE_WINDOW_S}
        log("  idle: " + ", ".join(f"{n} {v['cpu_cores'] * 100:.1f} % of a core, RSS {v['rss_kib'] / 1024:.0f} MiB"
                                   for n, v in self.results["idle"].items()))

    # --- measures 1, 2, 6
    def measure_streams(self) -> None:
        levels = [1, 10, 20, 50]
        rounds = self.args.rounds
        min_samples = 8 if self.quick else 20
        log(f"measures 1+2+6: concurrency {levels}, {rounds} rounds, targets interleaved")
        targets = self.targets()
        for rnd in range(rounds):
            for conc in levels:
                self.wait_quiet(f"streams round {rnd + 1} c={conc}")
                per_worker = 1 + max(2 if not self.quick else 1, math.ceil(min_samples / conc))
                line = []
                for name in self.order(rnd):
                    s = self.stream_cell(name, targets[name], conc, per_worker, 1, f"s{rnd}c{conc}", breakdown=True)
                    s["round"] = rnd
                    s.pop("_records")
                    self.results["streams"].append(s)
                    line.append(f"{name} ttft p95 {s['ttft_p95']:.0f} ms gap p95 {f1(s['gap_p95'])} ms "
                                f"(adm {f0(s['admission_p50'])}/dlv {f0(s['delivery_p50'])}, other {s['foreign_cores']:.1f} cores)"
                                f"{' ERR ' + str(s['errors']) if s['errors'] else ''}"
                                if s["ttft_p95"] is not None else f"{name} no data, {s['error_kinds']}")
                log(f"  round {rnd + 1}/{rounds} c={conc:<3d} " + " | ".join(line))

    # --- measure 3
    def measure_sustain(self) -> None:
        steps = [1, 5, 10, 20, 30, 50, 100] if self.quick else [1, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300]
        rounds = 1 if self.quick else 2
        log(f"measure 3: sustained concurrency, steps {steps}, {rounds} rounds per step; a gateway stops at its "
            "first failing step (added TTFT p95 >= 100 ms or any error)")
        targets = self.targets()
        active = list(GATEWAYS)
        for conc in steps:
            if not active:
                break
            cells: dict[str, list[dict]] = {n: [] for n in ["direct"] + active}
            for rnd in range(rounds):
                self.wait_quiet(f"sustain c={conc} round {rnd + 1}")
                for name in self.order(rnd, tuple(["direct"] + active)):
                    per_worker = 1 + max(2, math.ceil((8 if self.quick else 16) / conc))
                    s = self.stream_cell(name, targets[name], conc, per_worker, 1, f"u{rnd}c{conc}", timeout_s=30)
                    s.pop("_records")
                    s["round"] = rnd
                    cells[name].append(s)
            row = {"conc": conc, "direct": cells["direct"]}
            for name in active:
                added = [g["ttft_p95"] - d["ttft_p95"] if g["ttft_p95"] is not None and d["ttft_p95"] is not None
                         else None for g, d in zip(cells[name], cells["direct"])]
                errs = sum(c["errors"] for c in cells[name])
                a = med(added)
                passed = a is not None and a < 100 and errs == 0
                row[name] = {"cells": cells[name], "added_p95": a, "errors": errs, "pass": passed}
            self.results["sustain"].append(row)
            log(f"  c={conc:<3d} direct p95 {med(c['ttft_p95'] for c in cells['direct']):.0f} ms"
                f" (errors {sum(c['errors'] for c in cells['direct'])}) | " + " | ".join(
                    f"{n} added p95 {row[n]['added_p95'] if row[n]['added_p95'] is None else round(row[n]['added_p95'])}"
                    f" ms, errors {row[n]['errors']} -> {'pass' if row[n]['pass'] else 'FAIL'}" for n in active))
            active = [n for n in active if row[n]["pass"]]

    # --- measure 4
    def measure_cancel(self) -> None:
        n = 6 if self.quick else 10
        rounds = self.args.rounds
        log(f"measure 4: cancel latency, {n} sequential cancels per target per round, {rounds} rounds")
        targets = self.targets()
        prompt = "#sim tokens=250"  # a 5 s stream: a cancel that never reaches upstream is plain to see
        for rnd in range(rounds):
            for name in self.order(rnd):
                self.sim.wait_idle()
                s = self.stream_cell(name, targets[name], 1, n, 0, f"k{rnd}{name}", prompt=prompt, stagger=0,
                                     timeout_s=30, cancel_after=3)
                recs = s.pop("_records")
                closes = {r["text"].split("\n")[0]: r["close_wall"] for r in recs if r.get("close_wall")}
                lat, missing, outcomes = [], 0, {}
                deadline = time.monotonic() + 12
                while True:
                    st = self.sim.stats()
                    calls = {}
                    for req in st["requests"]:
                        try:
                            text = req["body"]["messages"][-1]["content"].split("\n")[0]
                        except (KeyError, IndexError, TypeError, AttributeError):
                            continue
                        if text in closes:
                            calls[req["call_id"]] = (text, req.get("outcome"))
                    cancels = {c["call_id"]: c for c in st["cancellations"]}
                    done = all(outcome is not None for _, outcome in calls.values()) and len(calls) >= len(closes)
                    if done or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                for cid, (text, outcome) in calls.items():
                    outcomes[outcome or "still_open"] = outcomes.get(outcome or "still_open", 0) + 1
                    if cid in cancels:
                        lat.append((cancels[cid]["observed_at"] - closes[text]) * 1000)
                missing = len(closes) - len(lat)
                row = {"target": name, "round": rnd, "n": len(closes), "latencies_ms": lat,
                       "p50": pct(lat, 50), "p95": pct(lat, 95), "not_cancelled": missing,
                       "upstream_outcomes": outcomes, "client_errors": s["errors"], "error_kinds": s["error_kinds"]}
                self.results["cancel"].append(row)
                log(f"  round {rnd + 1}/{rounds} {name:8s} cancel p50 {f1(row['p50'])} ms p95 {f1(row['p95'])} ms; "
                    f"{missing} never cancelled; upstream outcomes {outcomes}")
        self.sim.wait_idle(20)

    # --- measure 5
    def measure_burst(self) -> None:
        sizes = [50, 1000]
        rounds = {50: 1 if self.quick else 3, 1000: 1 if self.quick else 2}
        log("measure 5: bursts of identical requests; starting a second sluice at production pacer settings "
            "(SIMULATED_RPS=1 SIMULATED_BURST=2 SIMULATED_CONCURRENCY=3)")
        self.sluice_prod = Sluice("sluice_prod", self.sim.url, "1", "2", "3").start()
        targets = {"direct": direct_target(self.sim), "sluice_prod": self.sluice_prod.target(),
                   "litellm": self.litellm.target()}
        # warm the production sluice with one (distinct) request
        self.stream_cell("sluice_prod", targets["sluice_prod"], 1, 1, 0, "warmprod")
        for size in sizes:
            for rnd in range(rounds[size]):
                for name in self.order(rnd, ("direct", "sluice_prod", "litellm")):
                    self.sim.wait_idle(30)
                    time.sleep(1.0)  # let the production pacer's bucket refill (RPS=1)
                    s = self.stream_cell(name, targets[name], size, 1, 0, f"b{size}r{rnd}{secrets.token_hex(3)}",
                                         identical=True, stagger=0, timeout_s=120)
                    s.pop("_records")
                    s.update({"size": size, "round": rnd})
                    self.results["burst"].append(s)
                    log(f"  burst {size:4d} round {rnd + 1}/{rounds[size]} {name:11s}: upstream calls "
                        f"{s['upstream_calls']}, completed {s['ok']}/{size}, errors {s['errors']} {s['error_kinds']}, "
                        f"ttft p95 {s['ttft_p95'] if s['ttft_p95'] is None else round(s['ttft_p95'])} ms, "
                        f"wall {s['wall_s']:.1f} s")
        self.results["prod_pacer"] = self.sluice_prod.pacer

    # --- profile of sluice (py-spy)
    def profile_sluice(self, conc: int) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            log("profile: py-spy not found (pip install py-spy into .venv to enable); skipped")
            return
        log(f"profile: sluice at {conc} streams, py-spy on each of its processes (not a measured cell)")
        pids = sorted(self.sluice.pids)
        roles = label_roles(spy, pids, self.sluice.gw.proc.pid)
        tmp = str(RESULTS / f"spy-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
        os.makedirs(tmp, exist_ok=True)
        duration = 12
        spies = {p: subprocess.Popen([spy, "record", "-p", str(p), "-d", str(duration), "-r", "50", "-f", "raw",
                                      "--nonblocking", "-o", os.path.join(tmp, f"{p}.txt")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
                 for p in pids}
        try:
            time.sleep(1.0)
            before = {p: cpu_seconds({p}) for p in pids}
            t0 = time.monotonic()
            per_worker = 1 + max(2, math.ceil((duration - 2) / 0.8))
            res = run_cell({"target": self.sluice.target(), "concurrency": conc, "per_worker": per_worker,
                            "warmup": 1, "stagger_s": 0.8, "timeout_s": 60, "nonce": "prof"}, 300)
            wall = time.monotonic() - t0
            cpu = {p: cpu_seconds({p}) - before[p] for p in pids}
            for sp in spies.values():
                try:
                    sp.wait(duration + 30)
                except subprocess.TimeoutExpired:
                    sp.kill()
        finally:
            for sp in spies.values():
                if sp.poll() is None:
                    sp.kill()
                    sp.wait()
        tokens = sum(r["ntok"] for r in res["records"])
        procs = []
        for p in pids:
            stacks = _read_spy(os.path.join(tmp, f"{p}.txt"))
            procs.append({"pid": p, "role": roles.get(p) or _role_of(stacks), "cpu_s": cpu[p], "cores": cpu[p] / wall,
                          "top": _top_frames(stacks)})
        procs.sort(key=lambda x: -x["cpu_s"])
        summary = summarize_streams(res)
        self.results["profile"] = {"conc": conc, "wall_s": wall, "tokens": tokens, "procs": procs,
                                   "raw": str(Path(tmp).relative_to(ROOT)),
                                   "ttft_p95": summary["ttft_p95"], "total_cpu_s": sum(cpu.values())}
        for pr in procs[:6]:
            log(f"  {pr['role']:<24s} pid {pr['pid']:<7d} {pr['cores'] * 100:5.1f} % of a core; top: "
                + "; ".join(f"{f} {sh:.0f}%" for f, sh in pr["top"][:3]))
        self.cost_split(conc)

    def cost_split(self, conc: int) -> None:
        """Per-request vs per-token CPU: the same request rate with 30 tokens every 20 ms and with
        6 tokens every 100 ms (same stream duration), then CPU = a * requests + b * tokens."""
        log(f"cost split: {conc} streams, 30 tokens @ 20 ms vs 6 tokens @ 100 ms (same request rate)")
        configs = (("30 tokens @ 20 ms", 20, 30), ("6 tokens @ 100 ms", 100, 6))
        targets = {"sluice": self.sluice.target(), "litellm": self.litellm.target()}
        cells: dict = {}
        try:
            for rnd in range(2):
                for label, interval, tokens in configs:
                    self.sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=interval, tokens=tokens)
                    for name in self.order(rnd, GATEWAYS):
                        t0 = time.monotonic()
                        s = self.stream_cell(name, targets[name], conc, 3, 1, f"cs{rnd}{interval}", breakdown=True)
                        wall = time.monotonic() - t0
                        recs = s.pop("_records")
                        s.update({"requests": len(recs), "round": rnd, "config": label, "cell_wall_s": wall})
                        cells.setdefault((name, label), []).append(s)
                        log(f"  {label:18s} {name:8s}: {s['gw_cpu_s'] / s['wall_s']:.2f} cores, TTFT p95 {f0(s['ttft_p95'])} ms, "
                            f"admission p50 {f0(s['admission_p50'])} ms, delivery p50 {f0(s['delivery_p50'])} ms")
        finally:
            self.sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=SIM_INTERVAL_MS, tokens=SIM_TOKENS)
        split = {}
        for name in GATEWAYS:
            rows = []
            for label, _, _ in configs:
                cs = cells.get((name, label), [])
                rows.append({"config": label,
                             "cpu_s": med(c["gw_cpu_s"] for c in cs), "requests": med(c["requests"] for c in cs),
                             "tokens": med(c["tokens"] for c in cs), "ttft_p95": med(c["ttft_p95"] for c in cs),
                             "admission_p50": med(c["admission_p50"] for c in cs),
                             "delivery_p50": med(c["delivery_p50"] for c in cs),
                             "cores": med(c["gw_cpu_s"] / c["wall_s"] for c in cs)})
            (c1, r1, k1), (c2, r2, k2) = ((r["cpu_s"], r["requests"], r["tokens"]) for r in rows)
            det = r1 * k2 - r2 * k1
            per_req = (c1 * k2 - c2 * k1) / det if det else None
            per_tok = (r1 * c2 - r2 * c1) / det if det else None
            split[name] = {"rows": rows, "cpu_ms_per_request": per_req * 1000 if per_req is not None else None,
                           "cpu_ms_per_token": per_tok * 1000 if per_tok is not None else None}
            log(f"  {name}: ~{f1(split[name]['cpu_ms_per_request'])} ms CPU per request + "
                f"~{split[name]['cpu_ms_per_token']:.3f} ms CPU per token" if per_tok is not None else f"  {name}: -")
        self.results["cost_split"] = {"conc": conc, "gateways": split}

    def run(self) -> None:
        a = self.args
        measures = set(a.measures.split(","))
        self.warmup()
        if "1" in measures:
            self.measure_streams()
        if "3" in measures:
            self.measure_sustain()
        if "4" in measures:
            self.measure_cancel()
        if "5" in measures:
            self.measure_burst()
        if a.profile:
            self.profile_sluice(a.profile)
        self.results["memory"] = {"peak_rss_kib": dict(self.sampler.peak_rss), "peak_pss_kib": dict(self.sampler.peak_pss),
                                  "procs": dict(self.sampler.nprocs)}


ROLE_MARKERS = (  # most specific first: a forked actor's stack still shows its creator's frames
    ("PoolRuntime", "pool + stream hub"), ("PoolActor", "pool + stream hub"), ("StreamHub", "pool + stream hub"),
    ("CoalescerActor", "coalescer"), ("CoalescerLogic", "coalescer"), ("PacerActor", "pacer"),
    ("PacerLogic", "pacer"), ("MetricsActor", "metrics"), ("MetricsLogic", "metrics"),
    ("ThreadStore", "threads store"), ("_serve_http", "edge (uvicorn + bridge)"), ("uvicorn", "edge (uvicorn + bridge)"),
    ("SupervisorActor", "supervisor or an idle actor"), ("Logger", "thespian logger"), ("Admin", "thespian admin"),
)


# Frames every sample of a process goes through (entry points, and the Supervisor frames a forked
# actor inherits): left out of the "hottest functions" column.
WRAPPER_FRAMES = ("start (system.py)", "HostActor.receiveMessage", "HostActor._on_bytes", "SupervisorActor.on_wire",
                  "PoolRuntime._run", "RequestResponseCycle.run_asgi")


def label_roles(spy: str, pids, edge_pid: int) -> dict[int, str]:
    """pid -> role. A Thespian actor process still has, in its stack, the frame that forked it,
    whose locals name the actor class: `py-spy dump --locals` shows it (innermost first)."""
    names = {"PoolActor": "pool + stream hub", "CoalescerActor": "coalescer", "PacerActor": "pacer",
             "MetricsActor": "metrics", "ThreadStoreActor": "threads store", "SupervisorActor": "supervisor"}
    out = {}
    for p in pids:
        if p == edge_pid:
            out[p] = "edge (uvicorn + bridge)"
            continue
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(p), "--locals", "--nonblocking"], capture_output=True,
                                  text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m_ = re.search(r'"actors\.[a-z_]+\.([A-Za-z]+)"', dump)
        if m_:
            out[p] = names.get(m_.group(1), m_.group(1))
        elif "Logger" in dump or "logger" in dump.lower():
            out[p] = "thespian logger"
        elif "Admin" in dump:
            out[p] = "thespian admin"
    return out


def _read_spy(path: str) -> list[tuple[list[str], int]]:
    out = []
    try:
        for line in open(path):
            stack, _, n = line.rstrip().rpartition(" ")
            if stack:
                out.append((stack.split(";"), int(n)))
    except (OSError, ValueError):
        pass
    return out


def _role_of(stacks) -> str:
    text = " ".join({f for frames, _ in stacks for f in frames})
    for marker, role in ROLE_MARKERS:
        if marker in text:
            return role
    return "idle / unknown"


def _top_frames(stacks, n: int = 8) -> list[tuple[str, float]]:
    """Inclusive share of the samples per function of sluice's own code (actors/, edge/, protocols/)."""
    total = sum(c for _, c in stacks) or 1
    incl: dict[str, int] = {}
    for frames, count in stacks:
        seen = set()
        for f in frames:
            if any(d in f for d in ("actors/", "edge/", "protocols/")):
                name = f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")" if " (" in f else f
                if name not in seen:
                    seen.add(name)
                    incl[name] = incl.get(name, 0) + count
    # Leave out the wrappers every sample goes through (actor entry points, the loop runner).
    ranked = [(k, v / total * 100) for k, v in sorted(incl.items(), key=lambda kv: -kv[1]) if v / total < 0.9]
    return ranked[:n]


# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(open("/proc/meminfo").readline().split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def versions(litellm_version: str) -> dict:
    import importlib.metadata as md

    out = {"litellm": litellm_version}
    for dist in ("thespian", "starlette", "uvicorn", "httpcore", "h2", "msgpack", "matplotlib"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "-"
    for dist in ("uvicorn", "httpx", "fastapi", "openai"):
        v = pip_version(LITELLM_VENV / "bin" / "python", dist)
        out[f"litellm venv: {dist}"] = v or "-"
    try:
        out["sluice commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True).stdout.strip() + (" (+ uncommitted work in the tree)" if subprocess.run(
                                                  ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                                  capture_output=True, text=True).stdout.strip() else "")
    except OSError:
        pass
    return out


def f0(v, unit="") -> str:
    return "–" if v is None else f"{v:.0f}{unit}"


def f1(v, unit="") -> str:
    return "–" if v is None else f"{v:.1f}{unit}"


def ratio(a, b) -> str:
    if a is None or b is None:
        return "–"
    if b <= 0:
        return "n/a (LiteLLM ≤ 0)" if a > 0 else "n/a"
    return f"{a / b:.2f}"


def aggregate(results: dict) -> dict:
    """Medians across rounds, pairing each gateway's cell with the direct cell of its round."""
    agg: dict = {"streams": {}, "cpu": {}}
    rows = results["streams"]
    levels = sorted({r["conc"] for r in rows})
    for conc in levels:
        by_round = {}
        for r in rows:
            if r["conc"] == conc:
                by_round.setdefault(r["round"], {})[r["target"]] = r
        for name in TARGETS:
            cells = [br[name] for br in by_round.values() if name in br]
            entry = {k: med(c.get(k) for c in cells) for k in (
                "ttft_p50", "ttft_p95", "ttft_p99", "gap_p50", "gap_p95", "admission_p50", "admission_p95",
                "delivery_p50", "delivery_p95", "gw_ttft_p50", "gw_queue_p95", "foreign_cores",
                "edge_in_p50", "edge_in_p95", "actor_path_p50", "actor_path_p95")}
            entry["errors"] = sum(c["errors"] for c in cells)
            entry["n"] = sum(c["n"] for c in cells)
            entry["rounds"] = len(cells)
            entry["spread_p95"] = (min(c["ttft_p95"] for c in cells if c["ttft_p95"] is not None),
                                   max(c["ttft_p95"] for c in cells if c["ttft_p95"] is not None)) if any(
                c["ttft_p95"] is not None for c in cells) else None
            entry["loadgen_util"] = max(c["loadgen_cpu_s"] / c["wall_s"] for c in cells) if cells else None
            if name != "direct":
                for k in ("ttft_p50", "ttft_p95", "ttft_p99", "gap_p95", "admission_p50", "admission_p95",
                          "delivery_p50", "delivery_p95"):
                    diffs = [br[name][k] - br["direct"][k] for br in by_round.values()
                             if name in br and "direct" in br and br[name].get(k) is not None
                             and br["direct"].get(k) is not None]
                    entry["added_" + k] = med(diffs)
            tok = sum(c["tokens"] for c in cells)
            cpu = sum(c["gw_cpu_s"] for c in cells)
            entry["cpu_per_1k"] = cpu / tok * 1000 if tok else None
            entry["cpu_per_1k_rounds"] = [c["gw_cpu_s"] / c["tokens"] * 1000 for c in cells if c["tokens"]]
            entry["tokens"] = tok
            agg["streams"].setdefault(conc, {})[name] = entry
    return agg


def make_plots(results: dict, agg: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    made = []
    colors = {"direct": "#888888", "sluice": "#1f77b4", "litellm": "#d62728"}
    labels = {"direct": "direct (sim)", "sluice": "sluice", "litellm": "LiteLLM proxy"}
    levels = sorted(agg["streams"])
    if levels:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
        for ax, q in zip(axes, ("p50", "p95", "p99")):
            for name in TARGETS:
                ys = [agg["streams"][c][name]["ttft_" + q] for c in levels]
                ax.plot(levels, ys, marker="o", color=colors[name], label=labels[name])
            ax.set_title(f"TTFT {q} (median of rounds)")
            ax.set_xlabel("concurrent distinct streams")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(levels)
            ax.set_xticklabels([str(c) for c in levels])
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("client-side TTFT, ms, log scale (sim TTFT = 200 ms)")
        from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

        for ax in axes:
            ax.yaxis.set_major_locator(FixedLocator([200, 300, 500, 1000, 2000, 5000, 10000, 20000]))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        axes[0].legend()
        fig.suptitle("Time to first token vs concurrency: direct upstream, sluice, LiteLLM proxy")
        fig.tight_layout()
        path = IMG / "litellm-ttft-vs-concurrency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

        fig, ax = plt.subplots(figsize=(8, 4.2))
        width = 0.38
        xs = range(len(levels))
        for i, name in enumerate(GATEWAYS):
            ys = [agg["streams"][c][name]["cpu_per_1k"] or 0 for c in levels]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], ys, width, color=colors[name], label=labels[name])
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{c} stream{'s' if c > 1 else ''}" for c in levels])
        ax.set_ylabel("gateway CPU seconds per 1,000 streamed tokens")
        ax.set_title("Gateway CPU cost per 1,000 tokens (all gateway processes; lower is better)")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = IMG / "litellm-cpu-per-1k-tokens.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    if results["sustain"]:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for name in GATEWAYS:
            pts = [(row["conc"], row[name]["added_p95"]) for row in results["sustain"]
                   if name in row and row[name]["added_p95"] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[name], label=labels[name])
                for row in results["sustain"]:
                    if name in row and row[name]["errors"]:
                        ax.annotate(f"{row[name]['errors']} err", (row["conc"], row[name]["added_p95"] or 0),
                                    fontsize=8, color=colors[name])
        ax.axhline(100, color="black", linestyle="--", linewidth=1, label="100 ms limit")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        steps = [row["conc"] for row in results["sustain"]]
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("concurrent distinct streams")
        ax.set_ylabel("added TTFT p95 vs direct, ms")
        ax.set_title("Sustained concurrency: added TTFT p95 per step")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = IMG / "litellm-sustained.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return [str(p.relative_to(ROOT / "docs")) for p in made]


def sustained_level(results: dict, name: str) -> tuple[int | None, str]:
    best, note = None, ""
    for row in results["sustain"]:
        if name not in row:
            break
        if row[name]["pass"]:
            best = row["conc"]
        else:
            note = (f"fails at {row['conc']}: added p95 {f0(row[name]['added_p95'])} ms, "
                    f"{row[name]['errors']} errors")
            break
    else:
        if results["sustain"]:
            note = f"passed every step up to {results['sustain'][-1]['conc']} (the test's ceiling)"
    return best, note


def write_doc(results: dict, agg: dict, images: list[str], args) -> None:
    meta = results["meta"]
    L: list[str] = []
    add = L.append
    add("# sluice vs LiteLLM proxy vs the direct upstream")
    add("")
    add(f"Generated by `{meta['command']}` on {meta['date']} ({'quick run' if args.quick else 'full run'}, "
        f"{meta['duration_min']:.1f} min). Raw numbers: `{meta['results_file']}` (git-ignored).")
    add("")
    add("## Setup")
    add("")
    m = meta["machine"]
    add(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem_mib']} MiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}. **Shared**: other engineers ran test suites on the same 2 cores during the run "
        f"(1-min load average seen at cell starts: median {meta['load_median']:.2f}, max {meta['load_max']:.2f}).")
    add("- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    add(f"- Upstream: the simulated provider (`sim/provider.py`), one process, TTFT {SIM_TTFT_MS} ms, one token "
        f"every {SIM_INTERVAL_MS} ms, {SIM_TOKENS} tokens per answer (set by `POST /config`; the cancel test asks "
        "for 250 tokens with `#sim tokens=250`).")
    add(f"- sluice: `run.py` via `sim.testing.Gateway`, `SIMULATED_BASE_URL=<sim>` (sluice speaks h2c to it), "
        f"generous pacer `SIMULATED_RPS=1000 SIMULATED_BURST=1000 SIMULATED_CONCURRENCY=1000` for the "
        f"distinct-stream measures; a second sluice with the production pacer `SIMULATED_RPS=1 SIMULATED_BURST=2 "
        f"SIMULATED_CONCURRENCY=3` for the bursts. Clients use `POST /api/chat` (sluice's SSE). "
        f"{meta['sluice_procs']} processes (Thespian actors + edge).")
    add(f"- LiteLLM: `{LITELLM_COMMAND_SHOWN}`, model `openai/sim-1` with `api_base=<sim>/v1`, "
        "`num_retries: 0`, a random 32-hex `master_key`; everything else as it comes (including its access log). "
        "Clients use `POST /v1/chat/completions` with `stream: true`. Run with a scrubbed environment "
        f"(own HOME, `LITELLM_LOCAL_MODEL_COST_MAP=True`). {meta['litellm_procs']} process(es).")
    add("- Direct: the same requests straight to the simulator's `/v1/chat/completions` — the baseline that "
        "\"added\" figures subtract (per round, then the median over rounds).")
    add("- Load generator: `bench/litellm_loadgen.py`, a process of its own per cell: asyncio streams, one "
        "HTTP/1.1 connection per request, incremental chunked decoding and the project's SSE parser; TTFT = "
        "request start to the first content token as read by the client; inter-token gap = time between "
        "consecutive tokens of a stream (tokens merged into one delta share a time stamp). Each worker's first "
        "stream is a ramp-up and left out of the percentiles; workers start spread over one stream's duration. "
        f"Its own CPU use peaked at {meta['loadgen_util_max'] * 100:.0f} % of one core in any cell "
        "(so it was not the bottleneck).")
    add(f"- Rounds: {args.rounds} for measures 1, 2, 4, 6 (targets interleaved and rotated every round: "
        "A B C, B C A, C A B); medians of the per-round figures are reported.")
    add("")

    # measure 1
    levels = sorted(agg["streams"])
    if levels:
        add("## 1. Added TTFT vs concurrency (distinct streams)")
        add("")
        add("Client-side TTFT, ms. \"added\" = gateway − direct in the same round (median over rounds).")
        add("")
        add("| streams | direct p50 / p95 / p99 | sluice added p50 / p95 / p99 | LiteLLM added p50 / p95 / p99 "
            "| p95 ratio sluice/LiteLLM | errors (direct / sluice / LiteLLM) |")
        add("|---:|---|---|---|---:|---|")
        for c in levels:
            d, s, l_ = (agg["streams"][c][n] for n in TARGETS)
            add(f"| {c} | {f0(d['ttft_p50'])} / {f0(d['ttft_p95'])} / {f0(d['ttft_p99'])} "
                f"| {f1(s['added_ttft_p50'])} / {f1(s['added_ttft_p95'])} / {f1(s['added_ttft_p99'])} "
                f"| {f1(l_['added_ttft_p50'])} / {f1(l_['added_ttft_p95'])} / {f1(l_['added_ttft_p99'])} "
                f"| {ratio(s['added_ttft_p95'], l_['added_ttft_p95'])} "
                f"| {d['errors']} / {s['errors']} / {l_['errors']} |")
        add("")
        add("Absolute TTFT p95 per round (min–max across rounds, ms) — the noise: "
            + "; ".join(f"{c} streams: " + ", ".join(
                f"{n} {f0(agg['streams'][c][n]['spread_p95'][0])}–{f0(agg['streams'][c][n]['spread_p95'][1])}"
                for n in TARGETS if agg["streams"][c][n]["spread_p95"]) for c in levels) + ".")
        add("")
        add("![TTFT vs concurrency](img/litellm-ttft-vs-concurrency.png)")
        add("")
        add("Where the added TTFT goes (each stream matched to its upstream call by a nonce in the prompt; "
            "the simulator stamps when it received the call and when it sent the first byte). *Admission* = "
            "client start → upstream receives the call; *delivery* = upstream's first byte → the client reads "
            "the first token. Both are shown as added over direct (median over rounds), p50 / p95, ms. "
            "sluice's own meta `ttft_ms` (measured at the first provider byte) is shown for comparison.")
        add("")
        add("| streams | sluice admission | sluice delivery "
            "| sluice meta ttft_ms p50 | LiteLLM admission | LiteLLM delivery | other load on the machine "
            "(cores, median of cells) |")
        add("|---:|---|---|---:|---|---|---:|")
        for c in levels:
            d, s, l_ = (agg["streams"][c][n] for n in TARGETS)
            add(f"| {c} | {f1(s.get('added_admission_p50'))} / {f1(s.get('added_admission_p95'))} "
                f"| {f1(s.get('added_delivery_p50'))} / {f1(s.get('added_delivery_p95'))} | {f0(s.get('gw_ttft_p50'))} "
                f"| {f1(l_.get('added_admission_p50'))} / {f1(l_.get('added_admission_p95'))} "
                f"| {f1(l_.get('added_delivery_p50'))} / {f1(l_.get('added_delivery_p95'))} "
                f"| {f1(med([d.get('foreign_cores'), s.get('foreign_cores'), l_.get('foreign_cores')]))} |")
        add("")
        add("## 2. Added inter-token gap p95 (sim sends a token every 20 ms)")
        add("")
        add("| streams | direct gap p50 / p95 | sluice gap p50 / p95 (added p95) | LiteLLM gap p50 / p95 (added p95) |")
        add("|---:|---|---|---|")
        for c in levels:
            d, s, l_ = (agg["streams"][c][n] for n in TARGETS)
            add(f"| {c} | {f1(d['gap_p50'])} / {f1(d['gap_p95'])} | {f1(s['gap_p50'])} / {f1(s['gap_p95'])} "
                f"({f1(s['added_gap_p95'])}) | {f1(l_['gap_p50'])} / {f1(l_['gap_p95'])} ({f1(l_['added_gap_p95'])}) |")
        add("")

    # measure 3
    if results["sustain"]:
        add("## 3. Highest sustained concurrency (added TTFT p95 < 100 ms and 0 errors)")
        add("")
        add("Each step: every worker runs 1 ramp-up + max(2, ⌈16/streams⌉) measured streams (8 in a quick run); "
            f"{'1 round' if args.quick else '2 rounds'} per step (median added p95, errors summed); "
            "a gateway stops at its first failing step.")
        add("")
        add("| streams | direct TTFT p95 | sluice added p95 / errors | LiteLLM added p95 / errors |")
        add("|---:|---:|---|---|")
        for row in results["sustain"]:
            cells = []
            for n in GATEWAYS:
                if n in row:
                    cells.append(f"{f0(row[n]['added_p95'])} ms / {row[n]['errors']} "
                                 f"{'✅' if row[n]['pass'] else '❌'}")
                else:
                    cells.append("(stopped)")
            add(f"| {row['conc']} | {f0(med(c['ttft_p95'] for c in row['direct']))} ms | " + " | ".join(cells) + " |")
        add("")
        s_best, s_note = sustained_level(results, "sluice")
        l_best, l_note = sustained_level(results, "litellm")
        add(f"- sluice sustains **{s_best if s_best else '< ' + str(results['sustain'][0]['conc'])}** streams ({s_note}).")
        add(f"- LiteLLM sustains **{l_best if l_best else '< ' + str(results['sustain'][0]['conc'])}** streams ({l_note}).")
        if s_best and l_best:
            add(f"- Ratio sluice/LiteLLM: **{s_best / l_best:.1f}×**"
                + (" (a lower bound: sluice passed the test's ceiling)" if "ceiling" in s_note else "") + ".")
        add("")
        add("![Sustained concurrency](img/litellm-sustained.png)")
        add("")

    # measure 4
    if results["cancel"]:
        add("## 4. Cancel latency (client disconnect → upstream sees the cancel)")
        add("")
        add("Sequential streams of 250 tokens; the client aborts its TCP connection after the 3rd token; "
            "latency = the simulator's `observed_at` (from `/stats` `cancellations`) − the client's close time.")
        add("")
        add("| target | cancels | p50 ms | p95 ms | upstream never cancelled | upstream outcomes |")
        add("|---|---:|---:|---:|---:|---|")
        for name in TARGETS:
            rows = [r for r in results["cancel"] if r["target"] == name]
            if not rows:
                continue
            outcomes: dict = {}
            for r in rows:
                for k, v in r["upstream_outcomes"].items():
                    outcomes[k] = outcomes.get(k, 0) + v
            add(f"| {name} | {sum(r['n'] for r in rows)} | {f1(med(r['p50'] for r in rows))} "
                f"| {f1(med(r['p95'] for r in rows))} | {sum(r['not_cancelled'] for r in rows)} "
                f"| {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |")
        add("")

    # measure 5
    if results["burst"]:
        add("## 5. Bursts of identical requests")
        add("")
        add(f"All requests of a burst are sent at once with the same prompt. sluice runs its production pacer "
            f"({results.get('prod_pacer')}); LiteLLM runs as it comes. Upstream calls are counted by the "
            "simulator. Medians over rounds (rounds listed).")
        add("")
        add("| burst | target | rounds | upstream calls | completed | errors | TTFT p95 ms | wall s |")
        add("|---:|---|---:|---:|---:|---|---:|---:|")
        for size in sorted({b["size"] for b in results["burst"]}):
            for name in ("direct", "sluice_prod", "litellm"):
                rows = [b for b in results["burst"] if b["size"] == size and b["target"] == name]
                if not rows:
                    continue
                kinds: dict = {}
                for b in rows:
                    for k, v in b["error_kinds"].items():
                        kinds[k] = kinds.get(k, 0) + v
                label = {"sluice_prod": "sluice (prod pacer)", "litellm": "LiteLLM", "direct": "direct"}[name]
                add(f"| {size} | {label} | {len(rows)} | {' / '.join(str(b['upstream_calls']) for b in rows)} "
                    f"| {' / '.join(str(b['ok']) for b in rows)} "
                    f"| {sum(b['errors'] for b in rows)}{' ' + str(kinds) if kinds else ''} "
                    f"| {f0(med(b['ttft_p95'] for b in rows))} | {f1(med(b['wall_s'] for b in rows))} |")
        add("")

    # measure 6
    if levels:
        add("## 6. CPU per 1,000 streamed tokens and memory")
        add("")
        add("CPU = utime+stime summed over every process of the gateway's tree (`/proc/<pid>/stat`) across the "
            "measure-1 cells, divided by the tokens the clients received. The simulator's own CPU is shown for "
            "scale (the cost of producing the tokens).")
        add("")
        add("| streams | sluice CPU s / 1k tokens | LiteLLM CPU s / 1k tokens | ratio sluice/LiteLLM | sim (upstream) |")
        add("|---:|---:|---:|---:|---:|")
        for c in levels:
            s, l_, d = (agg["streams"][c][n] for n in ("sluice", "litellm", "direct"))
            add(f"| {c} | {s['cpu_per_1k']:.3f} | {l_['cpu_per_1k']:.3f} | {ratio(s['cpu_per_1k'], l_['cpu_per_1k'])} "
                f"| {d['cpu_per_1k']:.3f} |")
        add("")
        mem = results.get("memory", {})
        idle = results.get("idle", {})
        add("| gateway | processes | idle RSS MiB (sum) | peak RSS MiB (sum, sampled every 0.25 s) | peak PSS MiB |")
        add("|---|---:|---:|---:|---:|")
        for name, label in (("sluice", "sluice"), ("sluice_prod", "sluice (prod pacer, bursts only)"),
                            ("litellm", "LiteLLM")):
            if name not in mem.get("peak_rss_kib", {}):
                continue
            i = idle.get(name, {})
            add(f"| {label} | {mem['procs'].get(name, '–')} | {f0(i.get('rss_kib', 0) / 1024) if i else '–'} "
                f"| {mem['peak_rss_kib'][name] / 1024:.0f} | {mem['peak_pss_kib'].get(name, 0) / 1024:.0f} |")
        add("")
        add("RSS summed over processes counts pages shared between forked processes once per process; PSS "
            "splits them, so it is the fairer figure for sluice's many processes.")
        add("")
        if any("cpu_cores" in v for v in idle.values()):
            add("Idle CPU (no traffic, measured over 5 s after the warm-up): "
                + ", ".join(f"{ {'sluice': 'sluice', 'litellm': 'LiteLLM'}.get(n, n)} "
                            f"{v['cpu_cores'] * 100:.1f} % of a core" for n, v in idle.items() if "cpu_cores" in v)
                + ". This floor is included in the per-token figures above and dominates them at 1 stream.")
            add("")
        add("![CPU per 1k tokens](img/litellm-cpu-per-1k-tokens.png)")
        add("")

    prof = results.get("profile")
    if prof:
        add(f"## Profile of sluice at {prof['conc']} streams (py-spy, not a measured cell)")
        add("")
        add(f"{prof['tokens']} tokens in {prof['wall_s']:.1f} s; sluice used {prof['total_cpu_s']:.1f} CPU s "
            f"({prof['total_cpu_s'] / prof['wall_s']:.2f} cores, {prof['total_cpu_s'] / max(prof['tokens'], 1) * 1000:.2f} "
            f"s per 1k tokens; py-spy's sampling adds some); client TTFT p95 {f0(prof['ttft_p95'])} ms. Per process "
            "(role recognised from its stacks), with the functions of sluice's own code that were on the stack "
            f"most often (inclusive share of that process's samples; raw stacks in `{prof.get('raw', '')}`, "
            "git-ignored):")
        add("")
        add("| role | pid | CPU (% of a core) | hottest sluice functions (inclusive) |")
        add("|---|---:|---:|---|")
        for pr in prof["procs"]:
            if pr["cpu_s"] < 0.05 * prof["wall_s"] * 0.1:
                continue
            top = [(f, sh) for f, sh in pr["top"] if not any(w in f for w in WRAPPER_FRAMES)]
            add(f"| {pr['role']} | {pr['pid']} | {pr['cores'] * 100:.1f} | "
                + "; ".join(f"`{f}` {sh:.0f}%" for f, sh in top[:5]) + " |")
        add("")

    split = results.get("cost_split")
    if split:
        add(f"### Per-request vs per-token cost ({split['conc']} streams)")
        add("")
        add("The same request rate twice: answers of 30 tokens one every 20 ms, and of 6 tokens one every 100 ms "
            "(both streams last ~0.8 s), medians of 2 interleaved rounds; gateway CPU = a × requests + b × tokens "
            "solved from the two.")
        add("")
        add("| gateway | answer shape | gateway CPU (cores) | TTFT p95 ms | admission p50 (abs) | delivery p50 (abs) |")
        add("|---|---|---:|---:|---:|---:|")
        for name in GATEWAYS:
            g = split["gateways"].get(name)
            if not g:
                continue
            for r in g["rows"]:
                add(f"| {name} | {r['config']} | {f1(r['cores'])} | {f0(r['ttft_p95'])} | {f1(r['admission_p50'])} "
                    f"| {f1(r['delivery_p50'])} |")
        add("")
        add("| gateway | CPU per request (ms) | CPU per token (ms) |")
        add("|---|---:|---:|")
        for name in GATEWAYS:
            g = split["gateways"].get(name)
            if g:
                per_tok = g["cpu_ms_per_token"]
                add(f"| {name} | {f1(g['cpu_ms_per_request'])} | {'–' if per_tok is None else format(per_tok, '.3f')} |")
        add("")

    history = previous_runs(meta.get("results_file"))
    if history:
        add("## Run-to-run noise (every full run saved in bench/results/ on this machine)")
        add("")
        add("| run (UTC) | sluice commit | sluice / LiteLLM added TTFT p95 @ 20 streams (ms) | sustained streams sluice / LiteLLM "
            "| sluice cancel p95 (ms) | 1,000-burst upstream calls (sluice) |")
        add("|---|---|---|---|---:|---|")
        for h in history:
            add(f"| {h['date']}{' (this run)' if h['this'] else ''} | {h['commit']} | {f1(h['s20'])} / {f1(h['l20'])} "
                f"| {h['s_sus']} / {h['l_sus']} | {f1(h['cancel'])} | {h['burst']} |")
        add("")

    incidents = results.get("incidents") or []
    add("## Incidents during this run")
    add("")
    if not incidents:
        add("None: no cell had half or more of its streams fail.")
    for inc in incidents:
        metrics = inc.get("metrics")
        extra = ""
        if isinstance(metrics, dict):
            extra = (f"; sluice's own metrics then: upstream_calls {metrics.get('upstream_calls')}, active_streams "
                     f"{metrics.get('active_streams')}, error_rate {metrics.get('error_rate')}, latency p50 "
                     f"{f0((metrics.get('latency_ms') or {}).get('p50'))} ms")
        add(f"- {inc['at']}: **{inc['target']}** failed {inc['errors']} streams in cell `{inc['cell']}` "
            f"({inc['conc']} streams; {inc['error_kinds']}); a single probe request "
            f"{'succeeded' if inc['probe_ok'] else 'failed too, so it was restarted for the remaining measures'}"
            f"{extra}.")
    add("")

    # targets
    add("## Targets (this run)")
    add("")
    checks = meta.get("checks", [])
    add("| target | wanted | measured | verdict |")
    add("|---|---|---|---|")
    for c in checks:
        add(f"| {c['name']} | {c['wanted']} | {c['measured']} | {'✅ met' if c['ok'] else '❌ missed'} |")
    add("")
    add("<!-- analysis:begin -->")
    add(meta.get("analysis") or "## Analysis\n\n(Write the analysis here; it is kept when the benchmark re-runs.)")
    add("<!-- analysis:end -->")
    add("")
    add("## Reproduce")
    add("")
    add("```")
    add(".venv/bin/python -m bench.litellm_compare          # full run")
    add(".venv/bin/python -m bench.litellm_compare --quick  # short run")
    add("```")
    add("")
    add(f"LiteLLM is installed from `{meta['litellm_spec']}` into `bench/.peers/litellm-venv` (git-ignored), "
        "pinned because litellm 1.82.7/1.82.8 on PyPI were a supply-chain compromise; override with "
        "`--litellm-spec`. The script refuses known-compromised versions and any unexpected `.pth` file in "
        "that venv.")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(L) + "\n")


def previous_runs(this_file: str | None) -> list[dict]:
    rows = []
    for path in sorted(RESULTS.glob("litellm_compare-*.json")):
        try:
            saved = json.loads(path.read_text())
            res = saved["results"]
            if "--quick" in res["meta"].get("command", "") or "--measures" in res["meta"].get("command", ""):
                continue
            agg = aggregate(res)
            s20 = agg["streams"].get(20, {}).get("sluice", {}).get("added_ttft_p95")
            l20 = agg["streams"].get(20, {}).get("litellm", {}).get("added_ttft_p95")
            cancel = med(r["p95"] for r in res["cancel"] if r["target"] == "sluice")
            burst = "; ".join(str(b["upstream_calls"]) for b in res["burst"]
                              if b["target"] == "sluice_prod" and b["size"] == 1000)
            commit = res["meta"].get("versions", {}).get("sluice commit", "–").replace(" (+ uncommitted work in the tree)", "+")
            rows.append({"date": res["meta"].get("date", path.stem), "commit": commit, "s20": s20, "l20": l20,
                         "s_sus": sustained_level(res, "sluice")[0], "l_sus": sustained_level(res, "litellm")[0],
                         "cancel": cancel, "burst": burst or "–",
                         "this": this_file is not None and path.name == Path(this_file).name})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return rows


def compute_checks(results: dict, agg: dict) -> list[dict]:
    checks = []
    if 20 in agg["streams"]:
        s = agg["streams"][20]["sluice"]["added_ttft_p95"]
        l_ = agg["streams"][20]["litellm"]["added_ttft_p95"]
        ok = s is not None and l_ is not None and l_ > 0 and s <= l_ / 10
        checks.append({"name": "added TTFT p95 at 20 streams", "wanted": "≤ 1/10 of LiteLLM's",
                       "measured": f"sluice {f1(s)} ms vs LiteLLM {f1(l_)} ms (ratio {ratio(s, l_)})", "ok": ok})
    if results["sustain"]:
        sb, sn = sustained_level(results, "sluice")
        lb, ln = sustained_level(results, "litellm")
        ok = bool(sb) and bool(lb) and sb >= 3 * lb
        if sb and not lb:
            ok = True
        checks.append({"name": "sustained concurrency", "wanted": "≥ 3× LiteLLM's",
                       "measured": f"sluice {sb} ({sn}) vs LiteLLM {lb} ({ln})", "ok": ok})
    rows = [r for r in results["cancel"] if r["target"] == "sluice"]
    if rows:
        p95 = med(r["p95"] for r in rows)
        miss = sum(r["not_cancelled"] for r in rows)
        checks.append({"name": "cancel p95", "wanted": "≤ 20 ms", "measured": f"{f1(p95)} ms ({miss} never cancelled)",
                       "ok": p95 is not None and p95 <= 20 and miss == 0})
    rows = [b for b in results["burst"] if b["target"] == "sluice_prod" and b["size"] == 1000]
    if rows:
        ok = all(b["upstream_calls"] == 1 and b["errors"] == 0 for b in rows)
        checks.append({"name": "1,000 identical burst", "wanted": "1 upstream call, 0 errors",
                       "measured": "; ".join(f"{b['upstream_calls']} call(s), {b['errors']} errors" for b in rows),
                       "ok": ok})
    return checks


def read_analysis() -> str | None:
    try:
        text = DOC.read_text()
    except OSError:
        return None
    m_ = re.search(r"<!-- analysis:begin -->\n(.*?)\n<!-- analysis:end -->", text, re.S)
    return m_.group(1) if m_ else None


def leak_check(cells=(20, 20, 50, 50, 50)) -> int:
    """Does sluice give its pacer leases back? After each cell the streams are all over, so the
    pacer's in_flight (from /api/admin/state) should be 0; the simulator's open streams too."""
    token = secrets.token_hex(16)
    sim = sluice = None
    try:
        sim = Sim()
        sim.configure(ttft_ms=SIM_TTFT_MS, token_interval_ms=SIM_INTERVAL_MS, tokens=SIM_TOKENS)
        sluice = Sluice("sluice", sim.url, "1000", "1000", "1000")
        sluice.gw.env["SLUICE_ADMIN_TOKEN"] = token
        sluice.start()
        leaked = 0
        for i, conc in enumerate(cells):
            res = run_cell({"target": sluice.target(), "concurrency": conc, "per_worker": 3, "warmup": 1,
                            "stagger_s": 0.8, "timeout_s": 30, "nonce": f"leak{i}"}, 300)
            time.sleep(1.5)
            status, _, body = request("GET", sluice.gw.url + "/api/admin/state",
                                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
            state = json.loads(body)["results"]
            pacer = next(v for k, v in state.items() if k.startswith("pacer:"))
            coalescers = {k: len(v.get("in_flight") or []) for k, v in state.items() if k.startswith("coalescer:")}
            s = summarize_streams(res)
            leaked = pacer.get("in_flight", 0)
            log(f"cell {i + 1}: {conc} streams x 3, ok {s['ok']}/{s['n']}, errors {s['errors']}; afterwards: "
                f"simulator open streams {sim.stats()['streams_open']}, pacer in_flight {leaked}, "
                f"coalescer flights {coalescers}")
        log("leases leaked" if leaked else "no lease leaked")
        return 1 if leaked else 0
    finally:
        for thing in (sluice, sim):
            if thing is not None:
                thing.stop()


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.litellm_compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer rounds, samples and steps)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds for measures 1/2/4/6 (default 3, quick 2)")
    ap.add_argument("--measures", default="1,3,4,5", help="subset of measures to run: 1 (also 2 and 6), 3, 4, 5")
    ap.add_argument("--litellm-spec", default=DEFAULT_LITELLM_SPEC, help="pip requirement for the LiteLLM peer")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="seconds to wait, at most, before a round for other work on the machine to calm down")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks-litellm.md and plots")
    ap.add_argument("--profile", type=int, default=None, metavar="STREAMS",
                    help="after the measures, profile sluice with py-spy at this many streams (default 50 in a full "
                         "run when py-spy is installed; 0 = off)")
    ap.add_argument("--leak-check", action="store_true",
                    help="only: drive one sluice with bursts of 50 distinct streams and print its pacer's in-flight "
                         "leases after each (they should go back to 0 once the streams are over)")
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the doc and plots from a saved results file")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.profile is None:
        args.profile = 0 if args.quick else 50
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        results = saved["results"]
        args.quick = results["meta"]["command"].find("--quick") >= 0
        m_ = re.search(r"--rounds (\d+)", results["meta"]["command"])
        args.rounds = int(m_.group(1)) if m_ else (2 if args.quick else 3)
        for row in results["streams"]:
            row.setdefault("round", 0)
        agg = aggregate(results)
        results["meta"]["checks"] = compute_checks(results, agg)
        results["meta"]["analysis"] = read_analysis()
        images = make_plots(results, agg)
        write_doc(results, agg, images, args)
        log(f"wrote {DOC.relative_to(ROOT)} and {', '.join(images)} from {args.report_only}")
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    os.chdir(ROOT)
    if args.leak_check:
        return leak_check()
    log(f"bench.litellm_compare ({'quick' if args.quick else 'full'} run)")
    ensure_matplotlib()
    litellm_version = ensure_litellm(args.litellm_spec)
    bench = Bench(args)
    bench.results["meta"]["versions"] = versions(litellm_version)  # what is measured: the tree at the start
    started = time.time()
    try:
        bench.start()
        bench.results["meta"]["sluice_procs"] = len(bench.sluice.pids)
        bench.results["meta"]["litellm_procs"] = len(bench.litellm.pids)
        bench.results["meta"]["litellm_command"] = LITELLM_COMMAND_SHOWN
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        bench.stop()
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial = RESULTS / f"litellm_compare-interrupted-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        bench.results["meta"]["interrupted"] = True
        partial.write_text(json.dumps({"results": bench.results}, indent=1, default=str))
        log(f"partial raw results: {partial.relative_to(ROOT)} (no report written)")
        return 130
    except BaseException:
        bench.stop()
        raise
    bench.stop()

    results = bench.results
    cells = results["streams"] + [c for row in results["sustain"] for k in row if k != "conc"
                                  for c in (row[k] if k == "direct" else row[k]["cells"])]
    loads = [c["loadavg"] for c in cells + results["burst"]] or [0.0]
    utils = [c["loadgen_cpu_s"] / c["wall_s"] for c in cells + results["burst"] if c["wall_s"]] or [0.0]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / f"litellm_compare-{stamp}.json"
    results["meta"].update({
        "command": ".venv/bin/python -m bench.litellm_compare" + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds != (2 if args.quick else 3) else "")
        + (f" --measures {args.measures}" if args.measures != "1,3,4,5" else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_min": (time.time() - started) / 60, "machine": machine_info(),
        "load_median": statistics.median(loads), "load_max": max(loads), "loadgen_util_max": max(utils),
        "results_file": str(results_file.relative_to(ROOT)), "litellm_spec": args.litellm_spec,
    })
    agg = aggregate(results)
    results["meta"]["checks"] = compute_checks(results, agg)
    results_file.write_text(json.dumps({"results": results, "aggregate": agg}, indent=1, default=str))
    log(f"raw results: {results_file.relative_to(ROOT)}")
    if not args.no_doc:
        results["meta"]["analysis"] = read_analysis()
        images = make_plots(results, agg)
        write_doc(results, agg, images, args)
        log(f"wrote {DOC.relative_to(ROOT)} and {', '.join(images)}")
    for c in results["meta"]["checks"]:
        log(f"target {c['name']}: wanted {c['wanted']}; measured {c['measured']} -> {'met' if c['ok'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
