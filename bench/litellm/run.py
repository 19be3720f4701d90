"""Run: install the benchmark peers (LiteLLM, matplotlib), start and stop the simulated
provider, sluice and LiteLLM, and read their processes' CPU and memory."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def f0(v, unit="") -> str:
    return "–" if v is None else f"{v:.0f}{unit}"


def f1(v, unit="") -> str:
    return "–" if v is None else f"{v:.1f}{unit}"


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ----------------------------------------------------------------------------- install


def pip_version(python: Path, dist: str) -> str | None:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
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
        self.gw = Gateway(
            {
                "SIMULATED_BASE_URL": sim_url,
                "SIMULATED_RPS": rps,
                "SIMULATED_BURST": burst,
                "SIMULATED_CONCURRENCY": conc,
                "SLUICE_LOG_LEVEL": "WARNING",
                "SLUICE_MAX_CONNECTIONS_PER_CLIENT": "0",
                # As a user runs it: run.py's default unless the caller's environment sets it.
                "COALESCER_SHARDS": os.environ.get("COALESCER_SHARDS"),
            }
        )  # one loopback load generator
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
        return [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            self.config,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num_workers",
            "1",
        ]

    def start(self, timeout: float = 180.0) -> LiteLLM:
        # A scrubbed environment: the peer sees no credentials of this machine, has a HOME of its
        # own, and uses its bundled model-cost map instead of fetching one.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.tmp,
            "TMPDIR": self.tmp,
            "LANG": "C.UTF-8",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.tmp, preexec_fn=_die_with_parent
        )
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
        return {
            "name": "litellm",
            "host": "127.0.0.1",
            "port": self.port,
            "path": "/v1/chat/completions",
            "format": "openai",
            "model": "sim-1",
            "headers": {"Authorization": f"Bearer {self.key}"},
        }

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
    return {
        "name": "direct",
        "host": "127.0.0.1",
        "port": sim.port,
        "path": "/v1/chat/completions",
        "format": "openai",
        "model": "sim-1",
    }


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
