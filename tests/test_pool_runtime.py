"""The Pool's runtime against the simulated provider over h2c: a FailStream for a call the
Pacer's grant already opened stops that call (everyone left before the Coalescer saw the
grant), and the ending still gives the lease back and tells the Coalescer."""
from __future__ import annotations

import json
import time
import urllib.request

from actors.pool import Outbox, PoolRuntime
from protocols import config
from protocols import messages as m
from sim.provider import start_subprocess, stop_subprocess


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        return json.load(response)


def until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)
    return value


def test_fail_stream_stops_a_call_that_is_already_running():
    proc, port = start_subprocess()
    outbox = Outbox()
    runtime = None
    try:
        settings = config.load({"SIMULATED_BASE_URL": f"http://127.0.0.1:{port}", "SLUICE_HOST": "127.0.0.1"})
        runtime = PoolRuntime(settings, outbox)
        runtime.start()
        body = {"messages": [{"role": "user", "content": "long #sim ttft_ms=0 tokens=500 token_interval_ms=20"}]}
        runtime.open(m.OpenStream("s-1", "simulated", "sim-1", body, "s-1", 0.0, "127.0.0.1:1"))
        until(lambda: stats(port)["streams_open"] == 1)
        runtime.fail(m.FailStream("s-1", "cancelled", "cancelled before the upstream call started"))
        cancelled = until(lambda: stats(port)["cancellations"])
        assert len(cancelled) == 1 and stats(port)["streams_completed"] == 0
        effects = []
        until(lambda: effects.extend(outbox.drain()) or len(effects) >= 2)
        by_type = {type(e.msg): e for e in effects}
        assert by_type[m.LeaseRelease].msg.lease_id == "s-1"
        assert by_type[m.StreamFinished].msg.outcome == "cancelled"
    finally:
        if runtime is not None:
            runtime.stop()
        outbox.close()
        stop_subprocess(proc)
