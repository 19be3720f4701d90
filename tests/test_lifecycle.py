"""Starting and stopping run.py: bad configuration, Ctrl-C mid-stream, a killed
gateway, and sockets that stay on loopback. Each test runs a gateway of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.support import (
    ROOT,
    Gateway,
    SSEClient,
    chat_body,
    cmdline,
    data_events,
    descendants,
    free_port,
    get_json,
    listening_ports,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.integration


def run_py(env: dict) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, str(ROOT / "run.py")],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_configuration_fails_fast_naming_the_variable():
    for env, name in (
        ({"SLUICE_PORT": "eighty"}, "SLUICE_PORT"),
        ({"PERPLEXITY_RPS": "-1"}, "PERPLEXITY_RPS"),
        ({"COALESCE_ENABLED": "maybe"}, "COALESCE_ENABLED"),
        ({"SLUICE_PROVIDER": "nosuch"}, "SLUICE_PROVIDER"),
        ({"OPENAI_BASE_URL": "ftp://x", "SLUICE_PROVIDER": "openai"}, "OPENAI_BASE_URL"),
        ({"SLUICE_ALERT_ERROR_RATE": "5"}, "SLUICE_ALERT_"),
        ({"SLUICE_ALERT_TTFT_P95_MS": "soon"}, "SLUICE_ALERT_TTFT_P95_MS"),
        ({"SLUICE_LOG_FORMAT": "xml"}, "SLUICE_LOG_FORMAT"),
        ({"SLUICE_LOG_LEVEL": "chatty"}, "SLUICE_LOG_LEVEL"),
        ({"SLUICE_DRAIN_S": "-1"}, "SLUICE_DRAIN_S"),
    ):
        result = run_py(env)
        assert result.returncode == 2, (env, result.stderr)
        assert name in result.stderr and "configuration error" in result.stderr


def test_a_thread_store_file_that_cannot_be_opened_fails_fast_naming_sluice_db(tmp_path):
    # On main the start went on, the thread store's Wire failed, and 31 s later run.py
    # exited 3 with "the Pool's stream hub did not come up" (the SQLite error buried above).
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not SQLite " * 200)
    for db in (str(tmp_path), str(not_a_database)):
        result = run_py({"SLUICE_DB": db, "SLUICE_PORT": str(free_port()), "SLUICE_ACTOR_PORT": str(free_port())})
        assert result.returncode == 2, (db, result.stderr[-2000:])
        assert f"SLUICE_DB={db!r}" in result.stderr and "configuration error" in result.stderr


def test_ctrl_c_mid_stream_ends_the_stream_and_leaves_nothing():
    # run.py's defaults (its own simulated provider; one worker, so one Coalescer shard).
    gw = Gateway({"COALESCER_SHARDS": None}).start()
    try:
        actors = get_json(gw.url + "/readyz")[1]["actors"]
        assert [role for role in actors if role.startswith("coalescer:")] == ["coalescer:0"]
        client = SSEClient(
            gw.url + "/api/chat", chat_body(f"long {uuid.uuid4()}\n#sim tokens=1000 token_interval_ms=20")
        )
        while client.next()[1].get("type") != "delta":
            pass
        gw.proc.send_signal(signal.SIGINT)
        data = data_events(client.read_all())
        client.close()
        assert data[-1]["type"] == "error" and data[-1]["code"] == "shutting_down"
        assert gw.proc.wait(30) == 0
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=15, message="no process or port left")
    finally:
        gw.stop()
        gw.kill_leftovers()


def test_every_socket_listens_on_loopback_only():
    gw = Gateway().start()
    try:
        ports = listening_ports(gw.tree)
        # the edge, the actor admin, a socket per actor, the stream hub, the simulated provider
        assert {gw.port, gw.actor_port} <= {port for _, port in ports} and len(ports) >= 6, ports
        assert {addr for addr, _ in ports} == {"127.0.0.1"}, ports
    finally:
        gw.stop()
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=15, message="no process or port left")
        gw.kill_leftovers()


def watchdogs(gw) -> set[int]:
    """The orphan watchdog processes of `gw` (actors/watchdog.py, or `actors.system watch`)."""
    return {
        pid
        for pid in descendants(gw.proc.pid)
        if " actors.watchdog " in cmdline(pid) or " actors.system watch " in cmdline(pid)
    }


def stop_commands(gw) -> set[int]:
    """`python -m actors.system stop HOST PORT GROUP` for `gw`'s actor system, wherever it runs
    (the admin's watch starts it detached: after run.py's death nothing of `gw.tree` names it)."""
    needle = f" actors.system stop {gw.host} {gw.actor_port} "
    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit() and needle in cmdline(int(entry)) + " "}


def admin_of(gw) -> int:
    """The Thespian admin's pid (actors/system.py `admin_pid`) in the system's process group,
    named by the daemonizing child of run.py that leads it."""
    from actors.system import admin_pid, process_table

    table = process_table()
    [group] = [pid for pid, proc in table.items() if proc.parent == gw.proc.pid and proc.group == pid]
    admin = admin_pid(group, table)
    assert admin is not None, group
    return admin


def test_while_the_admin_lives_no_watchdog_process_runs():
    """The admin watches run.py itself (patches/thespian_admin_watch.py): the gateway's
    process set has no watchdog process, the admin is in it."""
    with running_gateway() as gw:
        assert admin_of(gw) in gw.tree
        assert watchdogs(gw) == set(), [cmdline(pid) for pid in watchdogs(gw)]


def test_a_killed_gateway_takes_its_actors_and_provider_with_it():
    """With no watchdog process: the admin's watch stops the system (its stop command ends too)."""
    gw = Gateway().start()
    try:
        assert watchdogs(gw) == set()
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=20, message="actors to notice and shut down")
        wait_until(lambda: stop_commands(gw) == set(), timeout=20, message="the stop command to end")
    finally:
        gw.kill_leftovers()


def test_with_the_admin_killed_a_watchdog_process_takes_over():
    """The admin SIGKILLed: run.py's keeper starts the watchdog process (within its 0.25 s
    turn); run.py SIGKILLed then: the watchdog stops what is left of the system."""
    gw = Gateway().start()
    try:
        admin = admin_of(gw)
        os.kill(admin, signal.SIGKILL)
        watchdog = wait_until(lambda: watchdogs(gw), timeout=15, message="a watchdog process")
        wait_until(lambda: f"admin (pid {admin}) is gone" in gw.output(), timeout=5, message="run.py's warning")
        gw.tree |= descendants(gw.proc.pid) | watchdog
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=30, message="the watchdog to stop the system")
    finally:
        gw.kill_leftovers()


def _ready_actors(gw) -> dict:
    from tests.support import get_json

    status, body = get_json(gw.url + "/readyz")
    return body["actors"] if status == 200 else {}


def test_the_supervisor_recreates_an_actor_that_dies():
    import os

    from tests.support import stream_chat

    gw = Gateway().start()
    try:
        before = _ready_actors(gw)
        for role in ("pool", "coalescer:0", "coalescer:1"):
            os.kill(before[role]["pid"], signal.SIGKILL)

        def recovered():
            actors = _ready_actors(gw)
            return actors and all(actors[r]["pid"] != before[r]["pid"] for r in ("pool", "coalescer:0", "coalescer:1"))

        wait_until(recovered, timeout=20, message="the dead actors to be recreated")

        def streams():
            status, _, events = stream_chat(gw.url + "/api/chat", chat_body(f"after {uuid.uuid4()}\n#sim tokens=2"))
            return status == 200 and data_events(events)[-1]["type"] == "done"

        wait_until(streams, timeout=20, interval=0.2, message="a stream through the new actors")
    finally:
        gw.stop()
        wait_until(lambda: gw.leftovers() == (set(), set()), timeout=15, message="no process or port left")
        gw.kill_leftovers()


def test_keepalive_pings_while_waiting_for_the_first_token():
    gw = Gateway({"SLUICE_KEEPALIVE_S": "0.1"}).start()
    try:
        client = SSEClient(gw.url + "/api/chat", chat_body(f"slow {uuid.uuid4()}\n#sim ttft_ms=700 tokens=1"))
        events = client.read_all()
        client.close()
        names = [name for name, _ in events]
        first_data = names.index("message")
        assert names[0] == "ping" and names[1:first_data].count("ping") >= 3  # pings before the meta
        assert data_events(events)[-1]["type"] == "done"
    finally:
        gw.stop()
        gw.kill_leftovers()
