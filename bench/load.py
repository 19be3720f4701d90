"""The load generator's pieces: one streaming request (to the simulated provider directly,
or through sluice's /api/chat), the processes under test, and the sim's /stats.

Client side is asyncio + httpcore, HTTP/1.1 to both targets (uvicorn serves HTTP/1.1
only, so the direct baseline uses the same client protocol; sluice itself speaks h2c to
the sim upstream). TTFT is client-observed: from just before the request is sent to the
arrival of the first byte of the first *delta* (not the ping, not the role chunk).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpcore

from bench.common import ROOT, alive, descendants, kill_pids, log

DIRECT_DELTA = re.compile(rb'"delta":\{"content":"[^"]')  # OpenAI chunk with a non-empty content
SLUICE_DELTA = re.compile(rb'"type":\s*"delta"')
SLUICE_META = re.compile(rb'data: (\{[^\n]*"type":\s*"meta"[^\n]*)\n')
DIRECT_DONE = b"data: [DONE]"
SLUICE_DONE = re.compile(rb'"type":\s*"done"')
SLUICE_ERROR = re.compile(rb'"type":\s*"error"')


def sim_prompt(tag: str, **knobs) -> str:
    directive = " ".join(f"{k}={v}" for k, v in knobs.items())
    return f"benchmark prompt {tag}\n#sim {directive}" if knobs else f"benchmark prompt {tag}"


def direct_body(prompt: str) -> dict:
    return {"model": "sim-1", "stream": True, "messages": [{"role": "user", "content": prompt}]}


def sluice_body(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}]}


@dataclass
class StreamResult:
    target: str
    prompt: str
    status: int | None = None
    sent_wall: float = 0.0  # time.time() just before sending (comparable with the sim's stamps)
    ttft_ms: float | None = None  # client-observed, first delta byte
    first_delta_wall: float | None = None
    total_ms: float | None = None
    complete: bool = False
    error: str | None = None
    meta: dict | None = None  # sluice's meta event (role, ttft_ms, queue_wait_ms)
    body: bytes = b""
    closed_wall: float | None = None  # when we hung up (cancel runs)
    extra: dict = field(default_factory=dict)


async def stream_once(
    pool: httpcore.AsyncConnectionPool,
    target: str,
    url: str,
    prompt: str,
    *,
    keep_body: bool = False,
    hang_up_after_first_delta: float | None = None,
    timeout: float = 30.0,
) -> StreamResult:
    """One streaming chat request. `target` is "direct" or "sluice". With
    `hang_up_after_first_delta=s`, the client closes the connection s seconds after the
    first delta (a client disconnect) and records when."""
    body = direct_body(prompt) if target == "direct" else sluice_body(prompt)
    delta_re = DIRECT_DELTA if target == "direct" else SLUICE_DELTA
    res = StreamResult(target, prompt)
    content = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
    t = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    buf = bytearray()
    res.sent_wall = time.time()
    t0 = time.perf_counter()
    try:
        async with pool.stream("POST", url, headers=headers, content=content, extensions={"timeout": t}) as resp:
            res.status = resp.status
            async for chunk in resp.aiter_stream():
                if res.ttft_ms is None:
                    buf += chunk
                    if delta_re.search(buf):
                        res.ttft_ms = (time.perf_counter() - t0) * 1000.0
                        res.first_delta_wall = time.time()
                        if target == "sluice":
                            meta = SLUICE_META.search(buf)
                            if meta:
                                res.meta = json.loads(meta.group(1))
                        if hang_up_after_first_delta is not None:
                            if hang_up_after_first_delta > 0:
                                await asyncio.sleep(hang_up_after_first_delta)
                            res.closed_wall = time.time()
                            break  # leaving the block closes the unfinished HTTP/1.1 connection
                else:
                    if keep_body or len(buf) < 4096:
                        buf += chunk
                    else:
                        buf[:] = buf[-256:] + chunk  # keep a tail for the end marker
            if res.closed_wall is None:
                tail = bytes(buf[-512:])
                if target == "direct":
                    res.complete = resp.status == 200 and DIRECT_DONE in tail
                else:
                    res.complete = resp.status == 200 and bool(SLUICE_DONE.search(tail))
                    if not res.complete and SLUICE_ERROR.search(bytes(buf)):
                        res.error = "error_event"
                if res.status != 200:
                    res.error = f"http_{res.status}"
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
        res.error = type(exc).__name__
    res.total_ms = (time.perf_counter() - t0) * 1000.0
    if keep_body:
        res.body = bytes(buf)
    return res


def new_pool(connections: int) -> httpcore.AsyncConnectionPool:
    return httpcore.AsyncConnectionPool(
        http1=True,
        http2=False,
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=60.0,
    )


# --- the sim's own view ---------------------------------------------------------------------
def sim_stats(sim_url: str) -> dict:
    with httpcore.ConnectionPool() as pool:
        r = pool.request(
            "GET", sim_url + "/stats", extensions={"timeout": {"connect": 5, "read": 10, "write": 5, "pool": 5}}
        )
        return json.loads(r.content)


def sim_post(sim_url: str, path: str, body: dict | None = None) -> dict:
    with httpcore.ConnectionPool() as pool:
        r = pool.request(
            "POST",
            sim_url + path,
            headers=[(b"content-type", b"application/json")],
            content=json.dumps(body or {}).encode(),
            extensions={"timeout": {"connect": 5, "read": 10, "write": 5, "pool": 5}},
        )
        return json.loads(r.content)


def prompt_of(call_body) -> str:
    try:
        return call_body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return ""


def get_json(url: str, timeout: float = 10.0):
    with httpcore.ConnectionPool() as pool:
        t = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        r = pool.request("GET", url, extensions={"timeout": t})
        return r.status, json.loads(r.content) if r.content else None


# --- processes under test -------------------------------------------------------------------
class Sim:
    """The simulated provider as a child process (sim.provider.start_subprocess)."""

    def __init__(self):
        self.proc = None
        self.port = None

    def start(self) -> Sim:
        from sim.provider import start_subprocess

        self.proc, self.port = start_subprocess()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            from sim.provider import stop_subprocess

            stop_subprocess(self.proc)
            self.proc = None


class GatewayProc:
    """`python run.py` on free ports (sim.testing.Gateway), started with a 10 ms
    readiness poll so the start-to-ready time is measured finely."""

    def __init__(self, env: dict | None = None):
        sys.path.insert(0, str(ROOT))
        from sim.testing import Gateway

        # One load generator on loopback is one client address holding up to 1,000
        # connections: the per-address cap (edge/http_limits.py) is off for benchmarks.
        # COALESCER_SHARDS as the caller's environment has it (unset: run.py's default, not
        # the tests' two shards).
        shards = os.environ.get("COALESCER_SHARDS")
        self.gw = Gateway({"SLUICE_MAX_CONNECTIONS_PER_CLIENT": "0", "COALESCER_SHARDS": shards, **(env or {})})
        self.ready_s: float | None = None
        self.argv = [sys.executable, str(ROOT / "run.py")]

    @property
    def url(self) -> str:
        return self.gw.url

    def start(self, timeout: float = 30.0) -> GatewayProc:
        gw = self.gw
        gw.log_path = os.path.join(gw.tmp, "gateway.log")
        gw.log = open(gw.log_path, "wb")
        t0 = time.monotonic()
        gw.proc = subprocess.Popen(self.argv, cwd=ROOT, env=gw.env, stdout=gw.log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        with httpcore.ConnectionPool() as pool:
            while time.monotonic() < deadline:
                if gw.proc.poll() is not None:
                    raise RuntimeError(f"run.py exited with {gw.proc.returncode}:\n{gw.output()}")
                try:
                    r = pool.request(
                        "GET",
                        gw.url + "/readyz",
                        extensions={"timeout": {"connect": 1, "read": 2, "write": 1, "pool": 1}},
                    )
                    if r.status == 200:
                        self.ready_s = time.monotonic() - t0
                        gw.tree = descendants(gw.proc.pid) | {gw.proc.pid}
                        return self
                except (httpcore.ConnectError, httpcore.ReadTimeout, httpcore.RemoteProtocolError, httpcore.ReadError):
                    pass
                time.sleep(0.01)
        raise RuntimeError(f"gateway not ready within {timeout}s:\n{gw.output()}")

    def pids(self) -> set[int]:
        if self.gw.proc is None:
            return set()
        return {p for p in (descendants(self.gw.proc.pid) | {self.gw.proc.pid}) if alive(p)}

    def stop(self) -> None:
        gw = self.gw
        if gw.proc is None:
            return
        try:
            gw.stop()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and gw.leftovers() != (set(), set()):
                time.sleep(0.05)
            procs, ports = gw.leftovers()
            if procs or ports:
                log(f"gateway leftovers after stop: processes {procs} ports {ports}; killing")
        finally:
            kill_pids(gw.tree)
            gw.kill_leftovers()
            gw.proc = None
