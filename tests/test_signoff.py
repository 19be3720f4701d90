"""The phase-1 sign-off scripts against a running gateway: prep_ttft_test.sh,
run_ttft_suite.sh, restore_prod_settings.sh (scripts/ttft_suite.py and
scripts/signoff_settings.py behind them).

This module runs its own simulated provider behind a fault proxy (`FaultProxy`), and its
own gateway whose simulated provider is that proxy, with an admin token and pacer settings
away from both the test and the production values, so that prep and restore visibly change
them. The proxy breaks the gateway's HTTP/2 connection on purpose — slower answers, slow or
missing cancels (RST_STREAM frames held back or dropped) — outside the product, so the
tests show that a real regression makes the suite FAIL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from protocols import config
from tests.support import ROOT, free_port, port_in_use, request, running_gateway, running_sim

pytestmark = pytest.mark.integration

TOKEN = "signoff-token"
CONFIGURED = {
    "SIMULATED_RPS": "2",
    "SIMULATED_BURST": "3",
    "SIMULATED_CONCURRENCY": "4",
    "SIMULATED_RPM": "70",
    # a Perplexity provider (never called here) so that its pacer exists, configured
    # away from the production values the restore script must put back
    "PERPLEXITY_API_KEY": "unused",
    "PERPLEXITY_RPS": "5",
    "PERPLEXITY_BURST": "6",
    "PERPLEXITY_CONCURRENCY": "7",
    "PACER_MAX_QUEUE": "77",
    "COALESCE_ERROR_TTL_S": "3",
    "SLUICE_ALERT_TTFT_P95_MS": "1234",
    # an "OpenAI" provider that is the simulated one in disguise: the suite measures
    # it as a real provider (its cancels by the gateway's upstream abort)
    "OPENAI_API_KEY": "unused",
}
LINES = [
    re.compile(r"^• TTFT \(streaming\) p95: ([\d,]+|n/a) ms \(target ≤ 1,500 ms\) — (PASS|FAIL)(.*)$"),
    re.compile(r"^• Cancel latency: ([\d,]+|n/a) ms \(target < 300 ms\) — (PASS|FAIL)(.*)$"),
    re.compile(r"^• Queue wait p95 \(TTFT run\): ([\d,]+|n/a) ms — (OK \(≈0\)|INVESTIGATE)(.*)$"),
]
GATE = re.compile(r"^• Gate: (added TTFT|cancel) p95 .*: ([\d,]+|n/a) ms \(gate ≤ [\d.]+ ms\) — (PASS|FAIL)$")
sys.path.insert(0, str(ROOT / "scripts"))
signoff_settings = importlib.import_module("signoff_settings")
signoff_http = importlib.import_module("signoff_http")


# --- a proxy that breaks the gateway's upstream connection on purpose ----------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RST_STREAM = 0x3


class FaultProxy:
    """TCP proxy to the simulated provider. On HTTP/2 connections (the gateway's) it can
    delay every byte the provider sends (`answer_delay_s`: a slower TTFT), and hold back
    (`reset_delay_s`) or drop (`drop_resets`) the gateway's RST_STREAM frames: a slow or a
    missing cancel. HTTP/1.1 connections (the suite's own calls to the provider: the
    baseline, /stats) pass untouched. `heal()` clears the faults and cuts every connection
    (streams left running by a dropped reset must not hold the next test's)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.answer_delay_s = self.reset_delay_s = 0.0
        self.drop_resets = False
        self.loop = asyncio.new_event_loop()
        self.writers: set = set()
        self.tasks: set = set()  # one per proxied connection
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        self.answer_delay_s = self.reset_delay_s = 0.0
        self.drop_resets = False
        asyncio.run_coroutine_threadsafe(self._cut(), self.loop).result(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _close(self) -> None:
        self.server.close()
        await self._cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _cut(self) -> None:
        for writer in list(self.writers):
            writer.close()

    async def _connection(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}
        try:
            try:
                first = await reader.readexactly(len(H2_PREFACE))
            except asyncio.IncompleteReadError as exc:
                first = exc.partial
            h2 = first == H2_PREFACE
            up_writer.write(first)
            await asyncio.gather(
                self._requests(reader, up_writer, h2), self._answers(up_reader, writer, h2), return_exceptions=True
            )
        finally:
            for w in (writer, up_writer):
                self.writers.discard(w)
                w.close()
            self.tasks.discard(task)

    async def _requests(self, reader, writer, h2: bool) -> None:
        """Gateway -> provider, frame by frame on HTTP/2, order kept. Chunks are stamped on
        arrival by the reader, so one held-back frame does not delay the next one's clock."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            buffer, release = b"", 0.0
            while (item := await queue.get()) is not None:
                arrived, data = item
                if not h2:
                    writer.write(data)
                    await writer.drain()
                    continue
                buffer += data
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    size = 9 + int.from_bytes(buffer[:3], "big")
                    frame, buffer = buffer[:size], buffer[size:]
                    delay = 0.0
                    if frame[3] == RST_STREAM:
                        if self.drop_resets:
                            continue
                        delay = self.reset_delay_s
                    release = max(release, arrived + delay)
                    if release > time.monotonic():
                        await asyncio.sleep(release - time.monotonic())
                    writer.write(frame)
                await writer.drain()
            writer.close()

        await self._pump(reader, queue, deliver, lambda: 0.0)

    async def _answers(self, reader, writer, h2: bool) -> None:
        """Provider -> gateway, each chunk `answer_delay_s` late on HTTP/2, order kept."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                writer.write(data)
                await writer.drain()
            writer.close()

        await self._pump(reader, queue, deliver, lambda: self.answer_delay_s if h2 else 0.0)

    @staticmethod
    async def _pump(reader, queue, deliver, delay) -> None:
        """Read, stamp, queue; `deliver` writes on its own clock. Both end together."""
        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + delay(), data))
            queue.put_nowait(None)
            await delivering
        finally:
            delivering.cancel()
            await asyncio.gather(delivering, return_exceptions=True)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy():
    with running_sim() as sim_url:
        with FaultProxy(int(sim_url.rsplit(":", 1)[1])) as p:
            p.sim = sim_url
            yield p


@pytest.fixture(scope="module")
def gw(proxy):
    with running_gateway(
        {"SIMULATED_BASE_URL": proxy.url, "OPENAI_BASE_URL": proxy.url, "SLUICE_ADMIN_TOKEN": TOKEN, **CONFIGURED}
    ) as gateway:
        yield gateway


@pytest.fixture
def env(gw, proxy, tmp_path):
    environment = {
        **os.environ,
        "SLUICE_URL": gw.url,
        "SLUICE_ADMIN_TOKEN": TOKEN,
        "SLUICE_PYTHON": sys.executable,
        "SLUICE_SIGNOFF_RECORD": str(tmp_path / "GO_NO_GO.md"),
        "SLUICE_SIGNOFF_SAVE_DIR": str(tmp_path / "saved"),
        "SLUICE_SIGNOFF_REQUESTS": "8",
        "SLUICE_SIGNOFF_PARALLEL": "4",
        "SLUICE_SIGNOFF_CANCELS": "3",
        "SLUICE_SIGNOFF_TIMEOUT_S": "30",
        "SLUICE_SIGNOFF_CANCEL_WAIT_S": "5",
    }
    yield environment
    proxy.heal()
    # every test leaves production behind it (and proves restore works while doing so)
    restored = sh("restore_prod_settings.sh", env=environment)
    assert restored.returncode == 0, restored.stdout + restored.stderr


def sh(script: str, *args, env, sourced: bool = False) -> subprocess.CompletedProcess:
    if sourced:  # the status the shell got back, and the environment it was left with
        command = ["bash", "-c", f'source ./{script} "$@"; echo "status=$?"; env', script, *args]
    else:
        command = ["bash", f"./{script}", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def admin(gw, method: str, path: str, body=None) -> dict:
    status, _, raw = request(
        method, gw.url + "/api/admin" + path, body=body, headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, raw
    return json.loads(raw)


def pacer_settings(gw, account: str = "simulated") -> dict:
    return admin(gw, "GET", f"/state?role=pacer:{account}")["results"][f"pacer:{account}"]["settings"]


def verdict(stdout: str) -> dict:
    """The sheet's three lines, the gate's lines if any, and the verdict line."""
    lines = stdout.splitlines()
    out = {"gate": {}}
    for pattern, key, line in zip(LINES, ("ttft", "cancel", "queue"), lines):
        match = pattern.match(line)
        assert match, stdout
        value, state, note = match.groups()
        out[key] = (None if value == "n/a" else int(value.replace(",", "")), state, note)
    for line in lines[3:-1]:
        match = GATE.match(line)
        assert match, stdout
        out["gate"][match.group(1)] = match.group(3)
    assert lines[-1].startswith("Verdict: "), stdout
    out["verdict"] = lines[-1]
    return out


def prep(env) -> None:
    done = sh("prep_ttft_test.sh", env=env)
    assert done.returncode == 0, done.stderr


# --- the sign-off ---------------------------------------------------------------------------------------


def test_prep_run_restore_go(gw, env, proxy, tmp_path):
    admin(gw, "POST", "/pacer/simulated", {"rps": 2, "burst": 3, "concurrency": 4, "rpm": 70})
    admin(gw, "POST", "/alerts/thresholds", {"ttft_p95_ms": 1234})
    done = sh("prep_ttft_test.sh", env=env)
    assert done.returncode == 0, done.stderr
    saved = re.search(r"saved in (\S+\.json)", done.stdout).group(1)  # prep names the file
    before = json.loads(open(saved).read())["in_force"]
    assert before["pacers"]["simulated"]["rps"] == 2.0 and before["pacers"]["simulated"]["rpm"] == 70
    assert (
        before["alert_thresholds"]["ttft_p95_ms"] == 1234.0
        and before["flags"]["coalescer:0"]["coalesce_enabled"] is True
    )
    prepped = pacer_settings(gw)
    assert (prepped["rps"], prepped["burst"], prepped["concurrency"], prepped["rpm"]) == (50.0, 50, 50, 70)

    run = sh("run_ttft_suite.sh", "--rehearsal", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    result = verdict(run.stdout)
    assert result["ttft"][1] == "PASS" and result["cancel"][1] == "PASS" and result["queue"][1] == "OK (≈0)"
    assert result["verdict"] == "Verdict: GO"
    assert result["ttft"][0] >= 50  # measured at the client: at least the provider's own 50 ms
    assert "gateway's own meta ttft_ms p95" in run.stderr  # the gateway's opinion: a diagnostic

    recorded = (tmp_path / "GO_NO_GO.md").read_text()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert "— GO — rehearsal" in recorded and f"Commit: {head}" in recorded
    assert f"Provider: simulated at {proxy.url}: simulated upstream on loopback" in recorded
    assert "pacer:simulated rps=50.0 burst=50 concurrency=50 rpm=70" in recorded
    assert "flags coalesce_enabled=True" in recorded and "ttft_p95_ms=1234.0" in recorded
    assert "the simulated provider's own record of the reset" in recorded
    assert all(line in recorded for line in run.stdout.splitlines())

    restore = sh("restore_prod_settings.sh", env={**env, "SLUICE_SIGNOFF_SAVED": saved})
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert "every value read back from the running actors matches" in restore.stdout
    assert "before prep, pacer:simulated rps: running 2.0, production 200.0" in restore.stdout
    production = json.loads((ROOT / "config" / "production.json").read_text())
    for account in ("simulated", "perplexity"):
        assert pacer_settings(gw, account) == production["pacers"][account]


def test_a_real_signoff_refuses_a_simulated_loopback_upstream(env):
    prep(env)
    run = sh("run_ttft_suite.sh", env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "refusing a real sign-off against simulated" in run.stderr and "--rehearsal" in run.stderr
    assert run.stdout == ""


def test_a_slow_cancel_fails_the_suite(env, proxy):
    prep(env)
    proxy.reset_delay_s = 0.45  # the gateway's aborts reach the provider 450 ms late
    run = sh("run_ttft_suite.sh", "--rehearsal", env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    result = verdict(run.stdout)
    assert result["cancel"][1] == "FAIL" and result["cancel"][0] >= 300
    assert result["ttft"][1] == "PASS" and "NO-GO (cancel latency)" in result["verdict"]


def test_a_missing_cancel_fails_with_the_count(env, proxy):
    prep(env)
    proxy.drop_resets = True  # the gateway believes it aborted; the provider never hears of it
    run = sh("run_ttft_suite.sh", "--rehearsal", env={**env, "SLUICE_SIGNOFF_CANCEL_WAIT_S": "1"})
    assert run.returncode == 1, run.stdout + run.stderr
    result = verdict(run.stdout)
    assert result["cancel"] == (None, "FAIL", " (only 0 of 3 cancels observed)")
    assert "NO-GO (cancel latency)" in result["verdict"]


def test_a_real_provider_is_measured_by_the_gateways_upstream_abort(env, proxy):
    prep({**env, "SLUICE_SIGNOFF_ACCOUNT": "openai"})
    # long answers, so the client leaves while the call still runs (a real provider is
    # asked for 500 words; this one reads no #sim directive from the suite)
    assert request("POST", proxy.sim + "/config", body={"tokens": 400, "token_interval_ms": 25})[0] == 200
    try:
        # all 8 TTFT requests at once: each is read to its end, 10 s with these answers
        run = sh("run_ttft_suite.sh", "openai", "--rehearsal", env={**env, "SLUICE_SIGNOFF_PARALLEL": "8"})
    finally:
        request("POST", proxy.sim + "/config/reset")
    assert run.returncode == 0, run.stdout + run.stderr
    result = verdict(run.stdout)
    assert result["cancel"][1] == "PASS" and result["verdict"] == "Verdict: GO"
    recorded = open(env["SLUICE_SIGNOFF_RECORD"]).read()
    assert f"Provider: openai at {proxy.url}: real upstream on loopback" in recorded
    assert "to the gateway's upstream abort (its Pool dropped the call; polled every 20 ms)" in recorded


def test_queue_wait_is_part_of_the_verdict(env):
    # prep with a stingy pacer: the run's requests wait for slots
    prep({**env, "SLUICE_SIGNOFF_RPS": "5", "SLUICE_SIGNOFF_BURST": "1", "SLUICE_SIGNOFF_CONCURRENCY": "1"})
    run = sh(
        "run_ttft_suite.sh",
        "--rehearsal",
        env={**env, "SLUICE_SIGNOFF_REQUESTS": "4", "SLUICE_SIGNOFF_PARALLEL": "2", "SLUICE_SIGNOFF_CANCELS": "1"},
    )
    assert run.returncode == 1, run.stdout + run.stderr
    result = verdict(run.stdout)
    assert result["queue"][1] == "INVESTIGATE" and result["queue"][0] > 10
    assert result["ttft"][1] == "PASS" and "NO-GO (queue wait)" in result["verdict"]


@pytest.mark.parametrize(
    "fault, delay, crossed", [("answer_delay_s", 0.2, "added TTFT"), ("reset_delay_s", 0.15, "cancel")]
)
def test_the_gate_sees_a_regression_the_sheet_would_pass(env, proxy, fault, delay, crossed):
    gate_env = {
        **env,
        "SLUICE_SIGNOFF_REQUESTS": "12",
        "SLUICE_SIGNOFF_CANCELS": "3",
        "SLUICE_GATE_MIN_REQUESTS": "12",
        "SLUICE_GATE_MIN_CANCELS": "3",
        "SLUICE_GATE_ATTEMPTS": "2",
    }
    prep(env)
    setattr(proxy, fault, delay)  # within the sheet's targets, over the gate's bounds
    # Long answers: with answers held back by the proxy, a short one could be fully sent by
    # the provider before the client's cancel reaches it, and then no abort is observed.
    assert request("POST", proxy.sim + "/config", body={"tokens": 400, "token_interval_ms": 25})[0] == 200
    try:
        # In full-suite runs on a loaded box, a whole run sometimes saw none of the cancels
        # that the proxy held back (passes alone, 0 of 3 in both gate attempts of a run;
        # cause not found, written in the issue notes). That is the missing-cancel case,
        # which test_a_missing_cancel_fails_with_the_count covers; this test is
        # about a late one, so a run that observed none is run once more.
        for _ in range(2):
            run = sh("run_ttft_suite.sh", "--rehearsal", "--gate", env=gate_env)
            if "cancels observed" not in run.stdout:
                break
    finally:
        request("POST", proxy.sim + "/config/reset")
    assert run.returncode == 1, run.stdout + run.stderr
    result = verdict(run.stdout)
    assert result["ttft"][1] == "PASS" and result["cancel"][1] == "PASS", run.stdout + run.stderr
    assert result["gate"][crossed] == "FAIL" and f"gate: {crossed}" in result["verdict"]
    assert "gate attempt 1 of 2 crossed" in run.stderr  # a second look, and it crossed again


# --- restore --------------------------------------------------------------------------------------------


class IgnoresRpm(signoff_http.Gateway):
    """A gateway that drops one setting of every set-pacer on the floor."""

    def admin(self, method, path, body=None):
        if path.startswith("/pacer/") and body:
            body = {k: v for k, v in body.items() if k != "rpm"}
        return super().admin(method, path, body)


def test_a_restore_that_does_not_restore_fails_listing_the_difference(gw, env):
    admin(gw, "POST", "/pacer/simulated", {"rpm": 70})
    said = []
    client = IgnoresRpm(gw.url, TOKEN)
    try:
        exports, restored = signoff_settings.restore(client, say=said.append)
    finally:
        client.pool.close()
    assert not restored
    assert "restore:   pacer:simulated rpm: running 70, production None" in said
    assert pacer_settings(gw)["rps"] == 200.0  # the rest was applied


def test_verify_sees_a_value_changed_behind_its_back(gw, env):
    admin(gw, "POST", "/flags", {"stream_fanout_enabled": False})
    admin(gw, "POST", "/alerts/thresholds", {"queue_wait_p95_ms": 900})
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ttft_suite.py"), "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout
    assert "coalescer:0 stream_fanout_enabled: running False, production True" in done.stdout
    assert "alert threshold queue_wait_p95_ms: running 900.0, production 1000.0" in done.stdout


def test_sourced_scripts_leave_production_for_a_restart(gw, env):
    prep_shell = sh("prep_ttft_test.sh", "simulated", env={**env, "SIMULATED_RPS": "50"}, sourced=True)
    assert "status=0" in prep_shell.stdout, prep_shell.stderr
    assert "SLUICE_SIGNOFF_ACCOUNT=simulated\n" in prep_shell.stdout and "SLUICE_SIGNOFF_SAVED=" in prep_shell.stdout
    assert "SIMULATED_BURST=" not in prep_shell.stdout  # prep exports no test value

    # a shell polluted with test values (an older prep, or by hand) is cleaned by restore
    polluted = {**env, "SIMULATED_RPS": "50", "PERPLEXITY_RPS": "50", "COALESCE_ENABLED": "0"}
    restore = sh("restore_prod_settings.sh", gw.url, env={**polluted, "SLUICE_URL": "http://127.0.0.1:1"}, sourced=True)
    assert "status=0" in restore.stdout, restore.stderr
    left = dict(line.split("=", 1) for line in restore.stdout.splitlines() if "=" in line)
    assert "SLUICE_SIGNOFF_ACCOUNT" not in left and "SLUICE_SIGNOFF_SAVED" not in left
    # "Restart backend" from that shell: run.py's settings are these
    production = signoff_settings.load_production()
    restarted = config.load(left)
    for account, values in production["pacers"].items():
        assert dataclasses.asdict(restarted.accounts[account.upper()]) == values, account
    assert restarted.coalesce_enabled is True and restarted.stream_fanout_enabled is True
    assert restarted.coalesce_error_ttl_s == production["flags"]["error_ttl_s"]
    assert restarted.alert_thresholds == production["alert_thresholds"]


# --- failing clearly -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["prep_ttft_test.sh", "run_ttft_suite.sh", "restore_prod_settings.sh"])
def test_the_scripts_fail_clearly_without_a_gateway(env, script):
    nowhere = f"http://127.0.0.1:{free_port()}"
    executed = sh(script, nowhere, env=env)
    assert executed.returncode == 2 and f"no gateway at {nowhere}" in executed.stderr
    sourced = sh(script, env={**env, "SLUICE_URL": nowhere}, sourced=True)
    assert sourced.returncode == 0 and "status=2" in sourced.stdout  # the shell went on


def test_a_wrong_token_is_named(env):
    done = sh("prep_ttft_test.sh", env={**env, "SLUICE_ADMIN_TOKEN": "nope"})
    assert done.returncode == 2 and "refused SLUICE_ADMIN_TOKEN" in done.stderr


def test_selfcheck_runs_a_gated_rehearsal_on_its_own_gateway(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ttft_suite.py"), "selfcheck"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "SLUICE_SIGNOFF_RECORD": str(tmp_path / "record.md")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = verdict(done.stdout)
    assert result["verdict"] == "Verdict: GO" and set(result["gate"]) == {"added TTFT", "cancel"}
    assert "— GO — rehearsal" in (tmp_path / "record.md").read_text()
    assert "every value read back from the running actors matches" in done.stderr
    ports = [int(p) for p in re.search(r"ports (\d+)/(\d+)", done.stderr).groups()]
    assert not any(port_in_use(p) for p in ports)  # its gateway and actor system are gone
