"""Operator commands against a running gateway: the /api/admin routes (auth, validation,
live changes the traffic obeys) and `python run.py admin ...` (edge/admin_cli.py).

The gateway here is this module's own (it needs an admin token, and the tests change its
settings); every test puts back what it changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.support import (
    ADMIN_AUTH,
    ADMIN_TOKEN,
    ROOT,
    SSEClient,
    admin,
    admin_gateway,
    admin_state,
    chat_body,
    free_port,
    get_json,
    port_in_use,
    request,
    stream_chat,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(sim):
    with admin_gateway(sim) as gateway:
        yield gateway


def configured_pacer(gw) -> dict:
    return admin_state(gw)["gateway"]["configured_pacers"]["simulated"]


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def open_until_meta(url: str, body: dict) -> tuple[SSEClient, dict]:
    """A stream read up to its meta event (it holds its pacer lease from then on)."""
    client = SSEClient(url + "/api/chat", body)
    assert client.status == 200, client.body()
    while True:
        name, data = client.next()
        if name == "message" and data["type"] == "meta":
            return client, data


def cli(gw_or_port, *args, env=None):
    """`run.py admin ...` with the operator's credentials: the admin token, and the gateway's
    secret file found the way the CLI finds it by default (next to SLUICE_DB)."""
    port = gw_or_port if isinstance(gw_or_port, int) else gw_or_port.actor_port
    where = {} if isinstance(gw_or_port, int) else {"SLUICE_DB": gw_or_port.db}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "admin", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "SLUICE_ACTOR_PORT": str(port),
            "PYTHONPATH": str(ROOT),
            "SLUICE_ADMIN_TOKEN": ADMIN_TOKEN,
            **where,
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- auth ------------------------------------------------------------------------------------


def test_admin_routes_need_the_bearer_token(gw):
    status, headers, body = admin(gw, "GET", "/state", headers={})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert headers["www-authenticate"].startswith("Bearer")
    assert admin(gw, "GET", "/state", headers={"authorization": f"Basic {ADMIN_TOKEN}"})[0] == 401
    status, _, body = admin(gw, "POST", "/drain", {"on": True}, headers={"authorization": "Bearer wrong"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert admin_state(gw)["results"]["supervisor"]["draining"] is False  # the refused drain did nothing


def test_admin_routes_do_not_exist_without_a_configured_token(gateway):
    for method, path in (
        ("GET", "/api/admin/state"),
        ("POST", "/api/admin/drain"),
        ("POST", "/api/admin/pacer/simulated"),
    ):
        status, _, raw = request(method, gateway.url + path, body={"on": True}, headers=ADMIN_AUTH)
        assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


# --- show ------------------------------------------------------------------------------------


def test_show_reports_every_actor(gw):
    data = admin_state(gw)
    results = data["results"]
    assert {"supervisor", "pool", "metrics", "pacer:simulated", "coalescer:0", "coalescer:1"} <= set(results)
    pacer = results["pacer:simulated"]
    assert set(pacer["settings"]) == {"rps", "burst", "concurrency", "rpm", "max_queue", "max_wait_s"}
    assert {"tokens", "queue_depth", "in_flight"} <= set(pacer)
    assert results["coalescer:0"]["flags"]["coalesce_enabled"] is True
    assert data["gateway"]["default_provider"] == "simulated"
    assert data["gateway"]["providers"]["simulated"]["account"] == "SIMULATED"
    # the fenced patches in force: the edge's Thespian ones, the Pool's httpcore ones too
    assert {"thespian_transport", "thespian_bind", "thespian_selector"} <= set(data["gateway"]["patches"])
    assert {
        "thespian_transport",
        "httpcore_h2_reads",
        "httpcore_h2_expiry",
        "httpcore_rst_stream",
        "httpcore_fast_locks",
        "httpcore_h2_one_write",
    } <= set(results["pool"]["patches"])

    status, _, one = admin(gw, "GET", "/state?role=coalescer")
    assert status == 200 and set(one["results"]) == {"coalescer:0", "coalescer:1"}
    status, _, body = admin(gw, "GET", "/state?role=nobody")
    assert status == 404 and body["error"]["code"] == "unknown_role" and "pacer:simulated" in body["error"]["message"]


# --- invalid commands change nothing -------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/pacer/simulated", {"rps": -1}, 422, "invalid_value"),
        ("/pacer/simulated", {"burst": 2.5}, 422, "invalid_value"),
        ("/pacer/simulated", {"rps": "fast"}, 422, "invalid_value"),
        ("/pacer/simulated", {"rps": 5, "concurrency": 0}, 422, "invalid_value"),  # all or nothing
        ("/pacer/simulated", {"warp": 9}, 422, "invalid_value"),
        ("/pacer/simulated", {}, 400, "invalid_request"),
        ("/pacer/nosuchaccount", {"rps": 5}, 404, "unknown_account"),
        ("/flags", {"coalesce_enabled": "no"}, 422, "invalid_value"),
        ("/flags", {"coalesce_enabled": False, "error_ttl_s": -1}, 422, "invalid_value"),
        ("/flags", {"teleport": True}, 422, "invalid_value"),
        ("/drain", {"on": "yes"}, 422, "invalid_value"),
        ("/drain", {}, 422, "invalid_value"),
        ("/alerts/thresholds", {"error_rate": 5}, 422, "invalid_value"),
        ("/pacer/simulated", "{not json", 400, "invalid_json"),
        ("/flags", [1, 2], 400, "invalid_request"),
        # absurd values: each was applied, and then the actor's state could not be shown
        # (no msgpack int for 1e30, no JSON for inf): /readyz 503 until an operator undid it
        ("/pacer/simulated", {"burst": 1e30}, 422, "invalid_value"),
        ("/pacer/simulated", {"max_wait_s": "inf"}, 422, "invalid_value"),
        ("/flags", {"error_ttl_s": 1e308}, 422, "invalid_value"),
        ("/alerts/thresholds", {"perf_window": 1e30}, 422, "invalid_value"),
    ],
)
def test_invalid_commands_are_4xx_and_change_nothing(gw, path, body, status, code):
    before = admin_state(gw)["results"]
    got, _, answer = admin(gw, "POST", path, body)
    assert got == status and answer["error"]["code"] == code, answer
    assert answer["error"]["message"]
    after = admin_state(gw)["results"]
    assert after["pacer:simulated"]["settings"] == before["pacer:simulated"]["settings"]
    assert [after[f"coalescer:{i}"]["flags"] for i in (0, 1)] == [before[f"coalescer:{i}"]["flags"] for i in (0, 1)]
    assert after["supervisor"]["draining"] is False
    assert request("GET", gw.url + "/readyz")[0] == 200


# --- live changes the traffic obeys ------------------------------------------------------------------


def test_live_pacer_settings_are_shown_and_obeyed(gw):
    configured = configured_pacer(gw)
    status, _, answer = admin(gw, "POST", "/pacer/simulated", {"concurrency": 1, "max_queue": 0, "rps": 3, "burst": 4})
    assert status == 200, answer
    try:
        shown = admin_state(gw)["results"]["pacer:simulated"]["settings"]
        assert (shown["concurrency"], shown["max_queue"], shown["rps"], shown["burst"]) == (1, 0, 3.0, 4)
        # one slow stream holds the only slot; a second, distinct request may not queue: 429
        first, _ = open_until_meta(gw.url, chat_body(unique("slot holder") + "\n#sim tokens=60 token_interval_ms=20"))
        try:
            status, headers, body = stream_chat(gw.url + "/api/chat", chat_body(unique("second")))
            assert status == 429 and body["error"]["code"] == "pacer_queue_full", body
            assert int(headers["retry-after"]) >= 1
        finally:
            first.close()
    finally:
        assert admin(gw, "POST", "/pacer/simulated", configured)[0] == 200
    assert admin_state(gw)["results"]["pacer:simulated"]["settings"] == configured
    # the slot comes back once the cancelled stream is released
    wait_until(lambda: stream_chat(gw.url + "/api/chat", chat_body(unique("after")))[0] == 200, timeout=10)


def roles_of_two_identical_requests(gw) -> list[str]:
    body = chat_body(unique("same") + "\n#sim tokens=40 token_interval_ms=20")
    a, meta_a = open_until_meta(gw.url, body)
    try:
        b, meta_b = open_until_meta(gw.url, body)
        b.close()
    finally:
        a.close()
    return sorted([meta_a["role"], meta_b["role"]])


def test_coalescing_switched_off_and_on_live(gw):
    status, _, answer = admin(gw, "POST", "/flags", {"coalesce_enabled": False})
    assert status == 200 and set(answer["results"]) == {"coalescer:0", "coalescer:1"}
    try:
        assert all(r["flags"]["coalesce_enabled"] is False for r in answer["results"].values())
        assert roles_of_two_identical_requests(gw) == ["leader", "leader"]
    finally:
        assert admin(gw, "POST", "/flags", {"coalesce_enabled": True})[0] == 200
    assert roles_of_two_identical_requests(gw) == ["follower", "leader"]


def test_drain_turns_new_chats_away_while_open_streams_finish(gw):
    open_stream, _ = open_until_meta(gw.url, chat_body(unique("in flight") + "\n#sim tokens=15 token_interval_ms=20"))
    try:
        status, _, answer = admin(gw, "POST", "/drain", {"on": True})
        assert status == 200 and answer["results"]["supervisor"]["draining"] is True
        # the route sets this edge's flag at once; polled only because the edge's own
        # once-a-second directory refresh may land just after and re-read the same state
        status, headers, body = wait_until(
            lambda: (lambda r: r if r[0] == 503 else None)(stream_chat(gw.url + "/api/chat", chat_body(unique("new")))),
            timeout=3,
            message="503 while draining",
        )
        assert body["error"]["code"] == "draining" and "retry-after" in headers
        # out of the balancer's rotation while the open stream goes on
        status, ready = get_json(gw.url + "/readyz")
        assert status == 503 and ready["ready"] is False and ready["draining"] is True and ready["stopping"] is False
        events = open_stream.read_all()
        assert events[-1][1]["type"] == "done"  # the stream already open finished normally
        assert get_json(gw.url + "/readyz")[0] == 503  # still draining
    finally:
        open_stream.close()
        assert admin(gw, "POST", "/drain", {"on": False})[0] == 200
    assert get_json(gw.url + "/readyz")[0] == 200
    assert stream_chat(gw.url + "/api/chat", chat_body(unique("back")))[0] == 200


def test_reset_metrics_forgets_the_samples(gw):
    stream_chat(gw.url + "/api/chat", chat_body(unique("measured")))
    # the edge records a request when its stream ends, just after the client saw the end
    wait_until(lambda: get_json(gw.url + "/api/metrics/performance?last_n=100")[1]["ttft_ms"]["count"] >= 1, timeout=5)
    status, _, answer = admin(gw, "POST", "/metrics/reset")
    assert status == 200 and answer["results"]["metrics"]["samples"]["request"] == 0
    perf = get_json(gw.url + "/api/metrics/performance?last_n=100")[1]
    assert perf["ttft_ms"]["count"] == 0 and perf["cancel_ms"]["count"] == 0


def test_alert_thresholds_change_live(gw):
    status, _, answer = admin(gw, "POST", "/alerts/thresholds", {"ttft_p95_ms": 1200})
    try:
        assert status == 200
        alerts = admin(gw, "GET", "/alerts")[2]["results"]["metrics"]
        assert alerts["thresholds"]["ttft_p95_ms"] == 1200 and "firing" in alerts
    finally:
        admin(gw, "POST", "/alerts/thresholds", {"ttft_p95_ms": 1500})


# --- the CLI -------------------------------------------------------------------------------------------


def test_cli_show_all_against_the_running_gateway(gw):
    done = cli(gw, "show", "all")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is True and {"pacer:simulated", "pool", "metrics", "supervisor"} <= set(out["results"])
    assert "open_streams" in json.dumps(out["results"]["pool"])


def test_cli_changes_settings_live_and_rejects_bad_values(gw):
    configured = configured_pacer(gw)
    done = cli(gw, "set-pacer", "simulated", "BURST=7", "rps=9")  # env-style names work too
    try:
        assert done.returncode == 0, done.stderr
        assert admin_state(gw)["results"]["pacer:simulated"]["settings"]["burst"] == 7
        for args, needle in (
            (("set-pacer", "simulated", "rps=abc", "burst=1"), "'rps'"),
            (("set-pacer", "nosuch", "rps=1"), "no pacer for account 'nosuch'"),
        ):
            bad = cli(gw, *args)
            assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
            assert json.loads(bad.stdout)["ok"] is False and needle in bad.stderr, (args, bad.stderr)
        settings = admin_state(gw)["results"]["pacer:simulated"]["settings"]
        assert (settings["burst"], settings["rps"]) == (7, 9.0)
    finally:
        admin(gw, "POST", "/pacer/simulated", configured)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["set-pacer", "simulated", "rps"], "expected key=value"),
        (["set-pacer"], "needs an account"),
        (["set-flags", "coalesce_enabled=maybe"], "coalesce_enabled must be true or false"),
        (["drain", "sideways"], "on or off"),
        (["show", "pool", "metrics"], "at most one role"),
    ],
)
def test_cli_usage_errors_are_named_before_anything_is_sent(args, needle, capsys):
    from edge.admin_cli import main

    assert main(args) == 2  # in-process: these never get as far as joining an actor system
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False and needle in err


def test_cli_drain_reaches_the_edge_within_its_refresh(gw):
    assert cli(gw, "drain", "on").returncode == 0
    try:
        wait_until(
            lambda: stream_chat(gw.url + "/api/chat", chat_body(unique("d")))[0] == 503,
            timeout=5,
            message="503 while draining",
        )
    finally:
        assert cli(gw, "drain", "off").returncode == 0
    wait_until(
        lambda: stream_chat(gw.url + "/api/chat", chat_body(unique("d")))[0] == 200,
        timeout=5,
        message="200 after drain off",
    )


def test_cli_fails_clearly_and_fast_when_no_gateway_runs():
    port = free_port()
    started = time.monotonic()
    done = cli(port, "show", "all")
    assert done.returncode == 1
    assert "no gateway is running" in done.stderr and str(port) in done.stderr
    assert json.loads(done.stdout)["error"]["code"] == "gateway_not_running"
    assert time.monotonic() - started < 10
    assert not port_in_use(port)  # it did not start an actor system of its own there


def test_cli_help_and_bad_configuration(monkeypatch, capsys):
    from edge.admin_cli import main

    assert main(["--help"]) == 0 and "set-pacer" in capsys.readouterr().out
    assert main([]) == 2
    monkeypatch.setenv("SLUICE_ACTOR_PORT", "not-a-port")
    assert main(["show"]) == 2 and "SLUICE_ACTOR_PORT" in capsys.readouterr().err
