"""The phase-1 sign-off scripts against a running gateway: prep_ttft_test.sh,
run_ttft_suite.sh, restore_prod_settings.sh (scripts/ttft_suite.py behind them).

This module runs its own simulated provider (the FAIL path slows it down) and its own
gateway with an admin token and configured pacer settings away from both the test and the
production values, so that prep and restore visibly change them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support import ROOT, free_port, port_in_use, request, running_gateway, running_sim

TOKEN = "signoff-token"
CONFIGURED = {"SIMULATED_RPS": "2", "SIMULATED_BURST": "3", "SIMULATED_CONCURRENCY": "4",
              # a Perplexity provider (never called here) so that its pacer exists, configured
              # away from the production values the restore script must put back
              "PERPLEXITY_API_KEY": "unused", "PERPLEXITY_RPS": "5", "PERPLEXITY_BURST": "6", "PERPLEXITY_CONCURRENCY": "7"}
LINES = [
    re.compile(r"^• TTFT \(streaming\) p95: ([\d,]+) ms \(target ≤ 1,500 ms\) — (PASS|FAIL)$"),
    re.compile(r"^• Cancel latency: ([\d,]+|n/a) ms \(target < 300 ms\) — (PASS|FAIL)$"),
    re.compile(r"^• Queue wait p95 \(TTFT run\): ([\d,]+|n/a) ms — (OK \(≈0\)|INVESTIGATE)$"),
]


@pytest.fixture(scope="module")
def own_sim():
    with running_sim() as url:
        yield url


@pytest.fixture(scope="module")
def gw(own_sim):
    with running_gateway({"SIMULATED_BASE_URL": own_sim, "SLUICE_ADMIN_TOKEN": TOKEN, **CONFIGURED}) as gateway:
        gateway.sim = own_sim
        yield gateway


@pytest.fixture
def env(gw, tmp_path):
    return {
        **os.environ,
        "SLUICE_URL": gw.url,
        "SLUICE_ADMIN_TOKEN": TOKEN,
        "SLUICE_PYTHON": sys.executable,
        "SLUICE_SIGNOFF_RECORD": str(tmp_path / "GO_NO_GO.md"),
        "SLUICE_SIGNOFF_REQUESTS": "8",
        "SLUICE_SIGNOFF_PARALLEL": "4",
        "SLUICE_SIGNOFF_CANCELS": "3",
        "SLUICE_SIGNOFF_TIMEOUT_S": "30",
    }


def sh(script: str, *args, env, sourced: bool = False) -> subprocess.CompletedProcess:
    if sourced:  # the status the shell got back, and proof that the shell went on
        command = ["bash", "-c", f'source ./{script} "$@"; echo "status=$?"; env | grep -E "^(SIMULATED|PERPLEXITY|SLUICE_SIGNOFF_ACCOUNT)" | sort', script, *args]
    else:
        command = ["bash", f"./{script}", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)


def pacer_settings(gw, account: str = "simulated") -> dict:
    role = f"pacer:{account}"
    status, _, raw = request("GET", gw.url + f"/api/admin/state?role={role}", headers={"authorization": f"Bearer {TOKEN}"})
    assert status == 200
    return json.loads(raw)["results"][role]["settings"]


def result_lines(stdout: str) -> list[tuple[str, str]]:
    lines = stdout.splitlines()
    assert len(lines) == 3, stdout
    out = []
    for pattern, line in zip(LINES, lines):
        match = pattern.match(line)
        assert match, line
        out.append(match.groups())
    return out


def test_prep_run_restore_pass(gw, env, tmp_path):
    assert (pacer_settings(gw)["rps"], pacer_settings(gw)["burst"], pacer_settings(gw)["concurrency"]) == (2.0, 3, 4)
    prep = sh("prep_ttft_test.sh", env=env)
    assert prep.returncode == 0, prep.stderr
    prepped = pacer_settings(gw)
    assert (prepped["rps"], prepped["burst"], prepped["concurrency"]) == (50.0, 50, 50)
    try:
        run = sh("run_ttft_suite.sh", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        (ttft, v1), (cancel, v2), (queue, v3) = result_lines(run.stdout)
        assert (v1, v2, v3) == ("PASS", "PASS", "OK (≈0)")
        assert int(ttft.replace(",", "")) < 1500 and int(cancel) < 300 and int(queue) == 0
        assert "TTFT run: 8/8 done" in run.stderr  # progress is shown, on stderr
        recorded = (tmp_path / "GO_NO_GO.md").read_text()
        assert "— PASS" in recorded and "pacer:simulated rps=50.0 burst=50 concurrency=50" in recorded
        assert all(line in recorded for line in run.stdout.splitlines())
    finally:
        restore = sh("restore_prod_settings.sh", env=env)
    assert restore.returncode == 0, restore.stderr
    restored = pacer_settings(gw)
    assert (restored["rps"], restored["burst"], restored["concurrency"]) == (2.0, 3, 4)  # as configured
    production = pacer_settings(gw, "perplexity")  # PERPLEXITY_RPS=1 CONCURRENCY=3 BURST=2, rpm kept
    assert (production["rps"], production["burst"], production["concurrency"], production["rpm"]) == (1.0, 2, 3, 50)


def test_a_slow_provider_fails_the_suite(gw, env):
    assert sh("prep_ttft_test.sh", env=env).returncode == 0
    assert request("POST", gw.sim + "/config", body={"ttft_ms": 1700})[0] == 200
    try:
        run = sh("run_ttft_suite.sh", env={**env, "SLUICE_SIGNOFF_REQUESTS": "4", "SLUICE_SIGNOFF_CANCELS": "2"})
    finally:
        request("POST", gw.sim + "/config/reset")
        sh("restore_prod_settings.sh", env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    (ttft, verdict), _, _ = result_lines(run.stdout)
    assert verdict == "FAIL" and int(ttft.replace(",", "")) >= 1700


def test_the_scripts_work_sourced_without_leaving_the_shell(gw, env):
    prep = sh("prep_ttft_test.sh", "simulated", env=env, sourced=True)
    assert "status=0" in prep.stdout, prep.stderr
    assert "SLUICE_SIGNOFF_ACCOUNT=simulated" in prep.stdout and "SIMULATED_RPS=50" in prep.stdout
    restore = sh("restore_prod_settings.sh", gw.url, env={**env, "SLUICE_URL": "http://127.0.0.1:1"}, sourced=True)
    assert "status=0" in restore.stdout, restore.stderr
    assert "PERPLEXITY_RPS=1\n" in restore.stdout and "PERPLEXITY_BURST=2" in restore.stdout
    assert "PERPLEXITY_CONCURRENCY=3" in restore.stdout and "SIMULATED_RPS=2\n" in restore.stdout
    assert "SLUICE_SIGNOFF_ACCOUNT" not in restore.stdout
    assert pacer_settings(gw)["rps"] == 2.0


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


def test_selfcheck_runs_a_whole_signoff_on_its_own_gateway(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ttft_suite.py"), "selfcheck"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
        env={**os.environ, "SLUICE_SIGNOFF_REQUESTS": "6", "SLUICE_SIGNOFF_CANCELS": "2",
             "SLUICE_SIGNOFF_RECORD": str(tmp_path / "record.md")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [verdict for _, verdict in result_lines(done.stdout)] == ["PASS", "PASS", "OK (≈0)"]
    assert (tmp_path / "record.md").exists()
    assert "no pacer:perplexity on this gateway" in done.stderr  # restore says so, and restores simulated
    ports = [int(p) for p in re.search(r"ports (\d+)/(\d+)", done.stderr).groups()]
    assert not any(port_in_use(p) for p in ports)  # its gateway and actor system are gone
