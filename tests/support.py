"""Test helpers: the process and HTTP helpers of sim/testing.py (shared with bench/),
re-exported so that test modules import them from one place; the operator's side of a
gateway (an admin token, the /api/admin routes) that several test modules drive; and an
SSE response read event by event with its ids (`EventStream`: resume tests)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpcore

from actors.system import cmdline
from protocols.sse import SSEParser
from sim.testing import (
    ROOT,
    Gateway,
    SSEClient,
    alive,
    chat_body,
    data_events,
    descendants,
    free_port,
    get_json,
    listening_ports,
    port_in_use,
    request,
    running_gateway,
    running_sim,
    stop_leaving_nothing,
    stream_chat,
    wait_until,
)

__all__ = [
    "ADMIN_AUTH",
    "ADMIN_TOKEN",
    "ROOT",
    "EventStream",
    "Gateway",
    "SSEClient",
    "admin",
    "admin_gateway",
    "admin_state",
    "alive",
    "cmdline",
    "chat_body",
    "data_events",
    "descendants",
    "free_port",
    "get_json",
    "listening_ports",
    "port_in_use",
    "request",
    "running_gateway",
    "stop_leaving_nothing",
    "running_sim",
    "stream_chat",
    "wait_until",
]

ADMIN_TOKEN = "test-admin-token"
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@contextmanager
def admin_gateway(sim: str) -> Iterator[Gateway]:
    """A gateway of its own in front of `sim` that takes ADMIN_TOKEN on /api/admin (a test
    module that changes settings must not share the session's `gateway`)."""
    with running_gateway({"SIMULATED_BASE_URL": sim, "SLUICE_ADMIN_TOKEN": ADMIN_TOKEN}) as gateway:
        yield gateway


def admin(gw: Gateway, method: str, path: str, body=None, headers=ADMIN_AUTH) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of /api/admin<path>, with the admin token unless told."""
    status, hdrs, raw = request(method, gw.url + "/api/admin" + path, body=body, headers=headers)
    return status, hdrs, json.loads(raw)


def admin_state(gw: Gateway) -> dict:
    """What every actor reports (GET /api/admin/state); fails unless it answers 200."""
    status, _, data = admin(gw, "GET", "/state")
    assert status == 200, data
    return data


class EventStream:
    """One SSE response read event by event, with each event's `id:` (pings skipped). On
    `pool` when given (a kept-alive connection the test chose), else on a pool of its own,
    closed with it. `close()` before the end of the body: the client is gone."""

    TIMEOUT = {"connect": 20.0, "read": 20.0, "write": 20.0, "pool": 20.0}

    def __init__(
        self,
        method: str,
        url: str,
        body: dict | None = None,
        headers: dict | None = None,
        pool: httpcore.ConnectionPool | None = None,
    ):
        self._own_pool = httpcore.ConnectionPool() if pool is None else None
        hdrs = dict(headers or {})
        content = None
        if body is not None:
            content, hdrs["content-type"] = json.dumps(body).encode(), "application/json"
        self._cm = (pool or self._own_pool).stream(
            method, url, headers=list(hdrs.items()), content=content, extensions={"timeout": self.TIMEOUT}
        )
        self.response = self._cm.__enter__()
        self.status = self.response.status
        self.headers = {k.decode().lower(): v.decode() for k, v in self.response.headers}
        self._chunks = self.response.iter_stream()
        self._parser, self._pending = SSEParser(), []

    def next(self) -> tuple[int | None, dict] | None:
        while True:
            while not self._pending:
                try:
                    self._pending.extend(self._parser.feed(next(self._chunks)))
                except StopIteration:
                    return None
            item = self._pending.pop(0)
            if item.event == "message":
                return (int(item.id) if item.id is not None else None), json.loads(item.data)

    def take(self, n: int) -> list[tuple[int | None, dict] | None]:
        return [self.next() for _ in range(n)]

    def rest(self) -> list[tuple[int | None, dict]]:
        out = []
        while (item := self.next()) is not None:
            out.append(item)
        return out

    def json(self) -> dict:
        return json.loads(self.response.read())

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        if self._own_pool is not None:
            self._own_pool.close()


def worker_pids(gw) -> dict[str, int]:
    """slot -> pid of each live worker, from the processes' command lines."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if parent == gw.proc.pid and b"edge.worker" in argv:
            out[argv[argv.index(b"--slot") + 1].decode()] = int(pid)
    return out


def read_in_background(clients: list[SSEClient]) -> tuple[dict[int, dict], list[threading.Thread]]:
    """Read each client to its end in a thread of its own (a test kills something while
    they stream): `ends[i]` is client i's last data event once its thread has ended."""
    ends: dict[int, dict] = {}

    def read(i: int, client: SSEClient) -> None:
        client.read_all()
        ends[i] = data_events(client.events)[-1]

    threads = [threading.Thread(target=read, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    return ends, threads


def ends_when_read(ends: dict[int, dict], threads: list[threading.Thread], clients, timeout: float) -> list[str]:
    """Wait (`timeout` a thread) for `read_in_background`'s readers, close `clients`, and
    -> each client's last event as "type:code", sorted; a reader still waiting is a hang."""
    for thread in threads:
        thread.join(timeout)
    for client in clients:
        client.close()
    assert not any(t.is_alive() for t in threads), "a client is still waiting"
    return sorted(e["type"] + ":" + e.get("code", "") for e in ends.values())


def run_with_h2_pool(test) -> None:
    """`await test(sim, pool)` on a fresh event loop: a simulated provider in this process and
    an HTTP/2-only httpcore pool (the tests of the Pool's httpcore patches)."""
    import asyncio

    from sim.provider import SimulatedProvider

    async def main():
        async with asyncio.timeout(60), SimulatedProvider() as sim:
            async with httpcore.AsyncConnectionPool(http1=False, http2=True) as pool:
                await test(sim, pool)

    asyncio.run(main())
