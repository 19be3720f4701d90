"""Process helpers shared by tests/ and bench/: start the real gateway (run.py) and the
real simulated provider as processes on free loopback ports, speak real HTTP to them, and
prove that nothing is left behind afterwards (no process of the tree, no listening port).

Tests import them through tests/support.py; benchmarks import them from here, so bench/
never depends on tests/."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpcore

from actors.system import alive, descendants

ROOT = Path(__file__).resolve().parent.parent


# Ports for servers the tests start are taken below the kernel's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): a port the kernel hands
# out as free can be given to an outgoing connection (Thespian's, from the same host
# address) before the server binds it, and the server then fails with "address in use".
SERVER_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now, outside the ephemeral range."""
    for port in random.sample(SERVER_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free server port at {host}")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def listening_ports(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by `pids`."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and inode in inodes:
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                if family == socket.AF_INET:
                    addr = socket.inet_ntop(family, raw[::-1])
                else:
                    addr = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                out.add((addr, int(port_hex, 16)))
    return out


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class Gateway:
    """A running `python run.py` on free ports; `host`: the loopback address its edge and
    actor system bind (127.0.0.2, ...: several hosts of a cluster on one machine)."""

    def __init__(self, env: dict[str, str | None] | None = None, host: str = "127.0.0.1"):
        import tempfile

        self.host = host
        self.port = free_port(host)
        self.actor_port = free_port(host)
        self.tmp = tempfile.mkdtemp(prefix="sluice-test-")
        self.db = os.path.join(self.tmp, "sluice.sqlite3")
        self.env = {
            **os.environ,
            "SLUICE_PORT": str(self.port),
            "SLUICE_ACTOR_PORT": str(self.actor_port),
            "SLUICE_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            "SLUICE_DB": self.db,
            # Two shards, not the one-worker default of one: most tests send keys to both, so
            # that what crosses shards (a shard lost beside a live one, moves) is exercised.
            "COALESCER_SHARDS": "2",
            **({"SLUICE_HOST": host, "SLUICE_ACTOR_HOST": host} if host != "127.0.0.1" else {}),
            **(env or {}),
        }
        self.env = {name: value for name, value in self.env.items() if value is not None}  # None: leave it unset
        self.url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.tree: set[int] = set()
        self.log_path = None

    def start(self, timeout: float = 30.0) -> Gateway:
        return self.launch().wait_serving(timeout)

    def launch(self) -> Gateway:
        """Start run.py without waiting for it to serve (`start` waits: `wait_serving`)."""
        self.log_path = os.path.join(self.tmp, "gateway.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py")], cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def wait_serving(self, timeout: float = 30.0) -> Gateway:
        """Until /readyz is 200 (run.py exiting, or not ready by `timeout`, fails)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"run.py exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _, _ = request("GET", self.url + "/readyz", timeout=2)
                if status == 200:
                    self.tree |= descendants(self.proc.pid) | {self.proc.pid}
                    return self
            except (httpcore.ConnectError, httpcore.ReadTimeout, httpcore.RemoteProtocolError):
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"gateway not ready within {timeout}s:\n{self.output()}")

    @property
    def secret_file(self) -> str:
        """Where run.py keeps its random cluster secret (SLUICE_SECRET_FILE's default)."""
        return self.env.get("SLUICE_SECRET_FILE") or os.path.join(self.tmp, f"cluster-{self.actor_port}.secret")

    def cluster_secret(self) -> str:
        """The secret a process joining this gateway's actor system needs."""
        return self.env.get("SLUICE_CLUSTER_SECRET") or Path(self.secret_file).read_text().strip()

    def output(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-5000:]
        except (OSError, TypeError):
            return ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        self.tree |= descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code

    def leftovers(self) -> tuple[set[int], set[int]]:
        """(processes still alive, our ports still bound) once stopped."""
        procs = {pid for pid in self.tree if alive(pid)}
        ports = {p for p in (self.port, self.actor_port) if port_in_use(p, self.host)}
        return procs, ports

    def kill_leftovers(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        for pid in self.tree:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@contextmanager
def running_sim():
    """The simulated provider as a process of its own; yields its base URL."""
    from sim.provider import start_subprocess, stop_subprocess

    proc, port = start_subprocess(port=0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_subprocess(proc)


@contextmanager
def running_gateway(env: dict[str, str | None] | None = None, host: str = "127.0.0.1"):
    gw = Gateway(env, host).start()
    try:
        yield gw
    finally:
        stop_leaving_nothing(gw)


def stop_leaving_nothing(gw: Gateway) -> None:
    """Stop the gateway and insist that no process or port of it is left (killed if so)."""
    gw.stop()
    try:
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=15, message="no process or port left")
    finally:
        gw.kill_leftovers()


# --- HTTP ------------------------------------------------------------------------------------
_pool = httpcore.ConnectionPool()


def request(method: str, url: str, body=None, headers=None, timeout: float = 10.0):
    """(status, headers dict, body bytes). `body` dict -> JSON."""
    hdrs = dict(headers or {})
    content = None
    if isinstance(body, (dict, list)):
        content = json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    elif isinstance(body, (bytes, str)):
        content = body.encode() if isinstance(body, str) else body
    response = _pool.request(
        method,
        url,
        headers=list(hdrs.items()),
        content=content,
        extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
    )
    return response.status, {k.decode().lower(): v.decode() for k, v in response.headers}, response.content


def get_json(url: str):
    status, _, body = request("GET", url)
    return status, json.loads(body)


def chat_body(text: str = "hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


class SSEClient:
    """One streaming request; read frames one by one, close whenever the test wants."""

    def __init__(self, url: str, body: dict, headers: dict | None = None, timeout: float = 20.0):
        from protocols.sse import SSEParser

        self._pool = httpcore.ConnectionPool()
        hdrs = {"content-type": "application/json", **(headers or {})}
        t = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        self._cm = self._pool.stream(
            "POST", url, headers=list(hdrs.items()), content=json.dumps(body).encode(), extensions={"timeout": t}
        )
        self.response = self._cm.__enter__()
        self.status = self.response.status
        self.headers = {k.decode().lower(): v.decode() for k, v in self.response.headers}
        self._chunks = self.response.iter_stream()
        self._parser = SSEParser()
        self._pending: list = []
        self.events: list[tuple[str, object]] = []  # (event name, parsed data)
        self.closed = False

    def next(self):
        """The next SSE event as (name, data) or None at the end of the stream."""
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return None
            self._pending.extend(self._parser.feed(chunk))
        item = self._pending.pop(0)
        data = json.loads(item.data) if item.data else None
        self.events.append((item.event, data))
        return item.event, data

    def read_all(self) -> list[tuple[str, object]]:
        while self.next() is not None:
            pass
        return self.events

    def body(self) -> bytes:
        return self.response.read()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cm.__exit__(None, None, None)
            self._pool.close()


def stream_chat(url: str, body: dict, headers: dict | None = None):
    client = SSEClient(url, body, headers)
    try:
        if client.status != 200:
            return client.status, client.headers, json.loads(client.body())
        return client.status, client.headers, client.read_all()
    finally:
        client.close()


def data_events(events) -> list[dict]:
    return [data for name, data in events if name == "message"]
