"""The Pool's runtime against the simulated provider over h2c: a FailStream for a call the
Pacer's grant already opened stops that call (everyone left before the Coalescer saw the
grant), and the ending still gives the lease back and tells the Coalescer."""

from __future__ import annotations

import pytest

from actors import secret
from actors.pool import Outbox, PoolRuntime
from protocols import auth, config
from protocols import messages as m
from tests.support import get_json, running_sim, wait_until

pytestmark = pytest.mark.integration


def stats(sim: str) -> dict:
    return get_json(f"{sim}/stats")[1]


def test_fail_stream_stops_a_call_that_is_already_running():
    if not secret.installed():  # the Pool's hub needs one (run.py installs it)
        secret.install(auth.new_secret())
    outbox, runtime = Outbox(), None
    with running_sim() as sim:
        try:
            settings = config.load({"SIMULATED_BASE_URL": sim, "SLUICE_HOST": "127.0.0.1"})
            runtime = PoolRuntime(settings, outbox)
            runtime.start()
            body = {"messages": [{"role": "user", "content": "long #sim ttft_ms=0 tokens=500 token_interval_ms=20"}]}
            runtime.open(m.OpenStream("s-1", "simulated", "sim-1", body, "s-1", 0.0, "127.0.0.1:1"))
            wait_until(lambda: stats(sim)["streams_open"] == 1)
            runtime.fail(m.FailStream("s-1", "cancelled", "cancelled before the upstream call started"))
            cancelled = wait_until(lambda: stats(sim)["cancellations"])
            assert len(cancelled) == 1 and stats(sim)["streams_completed"] == 0
            effects = []
            wait_until(lambda: effects.extend(outbox.drain()) or len(effects) >= 2)
            by_type = {type(e.msg): e for e in effects}
            assert by_type[m.LeaseRelease].msg.lease_id == "s-1"
            assert by_type[m.StreamFinished].msg.outcome == "cancelled"
        finally:
            if runtime is not None:
                runtime.stop()
            outbox.close()


def test_a_call_cancelled_before_its_task_ran_still_gives_everything_back():
    """OpenStream and FailStream handled in one turn of the loop: the call's task is
    cancelled before its first step (its coroutine never runs, nor its `finally`), and
    its end still reaches the logic (the task's done callback)."""
    if not secret.installed():
        secret.install(auth.new_secret())
    outbox = Outbox()
    # never contacted: the call is cancelled before it sends anything
    settings = config.load({"SIMULATED_BASE_URL": "http://127.0.0.1:9", "SLUICE_HOST": "127.0.0.1"})
    runtime = PoolRuntime(settings, outbox)
    try:
        runtime.start()
        opening = m.OpenStream("s-1", "simulated", "sim-1", {"messages": []}, "s-1", 0.0, "127.0.0.1:1")
        failing = m.FailStream("s-1", "cancelled", "everyone left")

        def both():
            runtime._handle(opening)
            runtime._handle(failing)

        runtime.loop.call_soon_threadsafe(both)
        effects = []
        wait_until(lambda: effects.extend(outbox.drain()) or len(effects) >= 2)
        by_type = {type(e.msg): e for e in effects}
        assert by_type[m.LeaseRelease].msg.lease_id == "s-1"
        assert by_type[m.StreamFinished].msg.outcome == "cancelled"
        assert runtime.state()["hub"]["open_streams"] == 0, "the hub got the stream's terminal event"
        assert runtime.state()["open_calls"] == []
    finally:
        runtime.stop()
        outbox.close()
