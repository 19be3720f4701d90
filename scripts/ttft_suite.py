"""The phase-1 sign-off suite against a running gateway (stdlib + httpcore only).

This module owns the sign-off procedure of the phase-1 sheet, done without restarts: the
pacer settings change through the admin routes of the running gateway.

    prep      TTFT-test pacer settings for the account under test   (prep_ttft_test.sh)
    run       streaming TTFT run + cancel run; prints the 3 lines   (run_ttft_suite.sh)
    restore   production pacer settings back                        (restore_prod_settings.sh)
    selfcheck start a gateway on the simulated provider, prep, run, restore, stop it
              (CI: one command, nothing left running)

Usage: ttft_suite.py COMMAND [URL] [ACCOUNT] [--exports FILE]. Environment:

    SLUICE_URL                 gateway URL (default http://localhost:8000)
    SLUICE_ADMIN_TOKEN         the gateway's admin token (prep/restore need it)
    SLUICE_SIGNOFF_ACCOUNT     pacer account under test (default: the default provider's)
    SLUICE_SIGNOFF_REQUESTS    streaming requests in the TTFT run (default 20)
    SLUICE_SIGNOFF_PARALLEL    of which at most this many at once (default 4)
    SLUICE_SIGNOFF_CANCELS     streams disconnected after their first delta (default 5)
    SLUICE_SIGNOFF_TIMEOUT_S   bound on each run, in seconds (default 120)
    SLUICE_SIGNOFF_RPS / _BURST / _CONCURRENCY   prep's settings (default: at least 50)
    SLUICE_SIGNOFF_RECORD      results file to append to (default PHASE1_GO_NO_GO.md next
                               to this repo's scripts; "none" to skip)

What is measured, and why:
  * TTFT p95: the `ttft_ms` of each request's meta event, i.e. the gateway's own measure
    (request accepted -> first provider byte), the figure the ttft alert watches. Every
    request of the run must also succeed, or the run FAILs. Nearest-rank p95.
  * Cancel latency: `cancel_ms.p95` of GET /api/metrics/performance over exactly the
    cancels of this run (the Pool measures edge disconnect -> upstream abort). The run
    waits until the Prometheus counter `sluice_cancel_latency_seconds_count` has grown by
    M, then asks for last_n = the number that arrived.
  * Queue wait p95: the `queue_wait_ms` of the TTFT run's meta events; ≈0 means <= 10 ms
    (with prep's settings nothing should wait for a pacer slot at all).

Exit codes: 0 all PASS; 1 a FAIL; 2 the suite could not run (no gateway, bad token, ...).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpcore

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "http://localhost:8000"
TTFT_TARGET_MS = 1500.0
CANCEL_TARGET_MS = 300.0
QUEUE_WAIT_OK_MS = 10.0
GENEROUS = 50  # prep: rps, burst and concurrency are raised to at least this
PRODUCTION = {"rps": 1.0, "concurrency": 3, "burst": 2}  # the sheet's PERPLEXITY_* values
PACER_KEYS = ("rps", "burst", "concurrency", "rpm", "max_queue", "max_wait_s")


class SuiteError(Exception):
    """The suite cannot run (exit 2); the message says why and what to do."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SuiteError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise SuiteError(f"{name}={raw!r} must be >= 1")
    return value


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- HTTP ------------------------------------------------------------------------------------------


class Gateway:
    def __init__(self, url: str, token: str | None):
        self.url, self.token = url.rstrip("/"), token
        self.pool = httpcore.ConnectionPool()  # thread-safe: shared by the run's workers

    def call(self, method: str, path: str, body=None, auth: bool = False, timeout: float = 10.0):
        headers = [(b"accept", b"application/json")]
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers.append((b"content-type", b"application/json"))
        if auth:
            headers.append((b"authorization", f"Bearer {self.token}".encode()))
        try:
            r = self.pool.request(method, self.url + path, headers=headers, content=content,
                                  extensions={"timeout": _timeouts(timeout)})
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise SuiteError(f"no gateway at {self.url} ({exc or 'connection refused'}): start it "
                             f"(`python run.py`) or pass its URL (argument or SLUICE_URL)") from None
        except httpcore.TimeoutException:
            raise SuiteError(f"{method} {self.url}{path}: no answer within {timeout:g} s") from None
        return r.status, r.content

    def admin(self, method: str, path: str, body=None) -> dict:
        if not self.token:
            raise SuiteError("SLUICE_ADMIN_TOKEN is not set: the admin routes need the gateway's token")
        status, raw = self.call(method, "/api/admin" + path, body, auth=True)
        if status == 404 and b"not_found" in raw:
            raise SuiteError(f"{self.url} has no admin routes: start the gateway with SLUICE_ADMIN_TOKEN set")
        if status in (401, 403):
            raise SuiteError(f"the gateway refused SLUICE_ADMIN_TOKEN ({status}): it is not the gateway's token")
        data = _json(raw)
        if status != 200:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise SuiteError(f"admin {path}: {status} {error.get('code', '')}: {error.get('message', raw[:200])}")
        return data

    def metrics_text(self) -> str:
        status, raw = self.call("GET", "/metrics")
        if status != 200:
            raise SuiteError(f"GET /metrics answered {status}")
        return raw.decode()

    def performance(self, last_n: int) -> dict:
        status, raw = self.call("GET", f"/api/metrics/performance?last_n={last_n}")
        if status != 200:
            raise SuiteError(f"GET /api/metrics/performance answered {status}")
        return _json(raw)


def _timeouts(seconds: float) -> dict:
    return {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return {}


# --- the account under test --------------------------------------------------------------------------


def target(gw: Gateway, account: str | None) -> tuple[str, str | None, dict]:
    """(account, provider to send requests to, admin state); account lower-case."""
    gw.call("GET", "/healthz")  # "no gateway" is the first thing to know
    state = gw.admin("GET", "/state")
    info = state["gateway"]
    providers = info["providers"]
    account = (account or providers[info["default_provider"]]["account"]).lower()
    if f"pacer:{account}" not in state["results"]:
        pacers = ", ".join(r.partition(":")[2] for r in sorted(state["results"]) if r.startswith("pacer:"))
        raise SuiteError(f"the gateway has no pacer for account {account!r} (pacers: {pacers})")
    matching = [n for n, p in providers.items() if p["account"].lower() == account]
    provider = info["default_provider"] if info["default_provider"] in matching else matching[0]
    return account, provider, state


def set_pacer(gw: Gateway, account: str, values: dict) -> dict:
    return gw.admin("POST", f"/pacer/{account}", values)["results"][f"pacer:{account}"]["settings"]


def _show(settings: dict) -> str:
    return " ".join(f"{k}={settings[k]}" for k in PACER_KEYS if k in settings)


def prep(gw: Gateway, account: str | None) -> list[str]:
    account, _, state = target(gw, account)
    before = state["results"][f"pacer:{account}"]["settings"]
    wanted = {
        "rps": float(os.environ.get("SLUICE_SIGNOFF_RPS") or max(before["rps"], GENEROUS)),
        "burst": _env_int("SLUICE_SIGNOFF_BURST", max(before["burst"], GENEROUS)),
        "concurrency": _env_int("SLUICE_SIGNOFF_CONCURRENCY", max(before["concurrency"], GENEROUS)),
    }
    after = set_pacer(gw, account, wanted)
    print(f"prep: pacer:{account} was {_show(before)}")
    print(f"prep: pacer:{account} now {_show(after)} (TTFT-test settings, live; no restart needed)")
    prefix = account.upper()
    return [f"export SLUICE_SIGNOFF_ACCOUNT={account}"] + [
        f"export {prefix}_{k.upper()}={_num(after[k])}" for k in ("rps", "burst", "concurrency")
    ]


def restore(gw: Gateway, account: str | None) -> list[str]:
    account, _, state = target(gw, account)
    configured = state["gateway"]["configured_pacers"]
    exports = ["unset SLUICE_SIGNOFF_ACCOUNT"]
    if "pacer:perplexity" in state["results"]:
        values = {**{k: configured["perplexity"][k] for k in PACER_KEYS}, **PRODUCTION}
        print(f"restore: pacer:perplexity now {_show(set_pacer(gw, 'perplexity', values))} (production)")
    else:
        print("restore: no pacer:perplexity on this gateway (no Perplexity provider configured); "
              f"restoring the configured settings of pacer:{account}")
    exports += [f"export PERPLEXITY_{k.upper()}={_num(v)}" for k, v in PRODUCTION.items()]
    if account != "perplexity":
        values = {k: configured[account][k] for k in PACER_KEYS}
        print(f"restore: pacer:{account} now {_show(set_pacer(gw, account, values))} (as configured at start)")
        exports += [f"export {account.upper()}_{k.upper()}={_num(values[k])}" for k in ("rps", "burst", "concurrency")]
    return exports


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- one streaming request ------------------------------------------------------------------------------


def stream_once(gw: Gateway, provider: str | None, prompt: str, stop_after_first_delta: bool, deadline: float) -> dict:
    """One POST /api/chat read as SSE, given up at `deadline` (monotonic). Returns {"ok",
    "meta", "error"}; with `stop_after_first_delta` the connection is dropped at the first
    delta (a disconnect)."""
    body = {"messages": [{"role": "user", "content": prompt}], "coalesce": False}
    if provider:
        body["provider"] = provider
    headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
    out = {"ok": False, "meta": None, "error": None}
    buffer = b""
    timeout = max(0.1, min(60.0, deadline - time.monotonic()))  # per read; keepalive pings reset it
    try:
        with httpcore.ConnectionPool() as pool, pool.stream(
            "POST", gw.url + "/api/chat", headers=headers, content=json.dumps(body).encode(),
            extensions={"timeout": _timeouts(timeout)},
        ) as response:
            if response.status != 200:
                error = _json(response.read()).get("error", {})
                out["error"] = f"HTTP {response.status} {error.get('code', '')}"
                return out
            for chunk in response.iter_stream():
                if time.monotonic() > deadline:
                    out["error"] = "the run's time was up before this stream ended"
                    return out
                buffer += chunk.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    data = b"\n".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
                    event = _json(data) if data else {}
                    kind = event.get("type") if isinstance(event, dict) else None
                    if kind == "meta":
                        out["meta"] = event
                    elif kind == "delta" and stop_after_first_delta:
                        out["ok"] = True
                        return out  # leaving the block closes the connection: the disconnect
                    elif kind == "done":
                        out["ok"] = True
                        return out
                    elif kind == "error":
                        out["error"] = f"error event {event.get('code')}: {event.get('message', '')}"
                        return out
        out["error"] = "the stream ended without a terminal event"
    except httpcore.TimeoutException:
        out["error"] = f"no progress within {timeout:g} s"
    except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
        out["error"] = f"connection failed: {exc}"
    return out


def many(label: str, jobs: list, parallel: int, deadline: float, work) -> list[dict]:
    """Run `work(job)` for every job, `parallel` at a time, within `deadline`; show progress."""
    results: list[dict] = []
    lock = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(work, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(0.1, deadline - time.monotonic())):
                with lock:
                    results.append(future.result())
                    ok = sum(1 for r in results if r["ok"])
                    progress(f"  {label}: {len(results)}/{len(jobs)} done, {ok} ok")
        except concurrent.futures.TimeoutError:
            for f in futures:
                f.cancel()
            progress(f"  {label}: time is up after {len(results)}/{len(jobs)}")
    return results


def p95(values: list[float]) -> float | None:
    """Nearest rank, as actors/metrics_logic.py computes it."""
    values = sorted(values)
    if not values:
        return None
    return values[max(1, -(-95 * len(values) // 100)) - 1]


# --- the run ------------------------------------------------------------------------------------------------


def cancel_count(gw: Gateway) -> float:
    for line in gw.metrics_text().splitlines():
        if line.startswith("sluice_cancel_latency_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def run(gw: Gateway, account: str | None) -> tuple[list[str], bool, str]:
    """The three result lines, whether all passed, and a settings note for the record."""
    n = _env_int("SLUICE_SIGNOFF_REQUESTS", 20)
    parallel = _env_int("SLUICE_SIGNOFF_PARALLEL", 4)
    m = _env_int("SLUICE_SIGNOFF_CANCELS", 5)
    bound = _env_int("SLUICE_SIGNOFF_TIMEOUT_S", 120)
    provider, note = None, "provider: the gateway's default (no admin token to look it up)"
    gw.call("GET", "/healthz")  # "no gateway" is the first thing to know
    if gw.token:
        account, provider, state = target(gw, account)
        note = f"provider {provider}, pacer:{account} {_show(state['results'][f'pacer:{account}']['settings'])}"
    note += f"; {n} streaming requests ({parallel} at a time), {m} cancels"
    progress(f"sign-off against {gw.url}: {note}")
    sim = provider == "simulated"
    run_id = uuid.uuid4().hex[:8]

    progress(f"TTFT run: {n} distinct streaming requests")
    prompts = [f"sign-off TTFT probe {run_id}-{i}: answer in one short sentence." for i in range(n)]
    deadline = time.monotonic() + bound
    ttft = many("TTFT run", prompts, parallel, deadline, lambda p: stream_once(gw, provider, p, False, deadline))
    failed = [r["error"] for r in ttft if not r["ok"]] + ["not run"] * (n - len(ttft))
    metas = [r["meta"] for r in ttft if r["ok"] and r["meta"]]
    ttft_p95 = p95([meta["ttft_ms"] for meta in metas if meta.get("ttft_ms") is not None])
    queue_p95 = p95([meta.get("queue_wait_ms") or 0.0 for meta in metas])
    if failed:
        progress(f"  {len(failed)} of {n} requests failed, e.g. {failed[0]}")

    progress(f"cancel run: {m} streams, each disconnected after its first delta")
    before = cancel_count(gw)
    # The simulated provider is told to answer slowly, so the stream is still running when
    # the client leaves; a real provider is asked for a long answer.
    long = "\n#sim tokens=400 token_interval_ms=25" if sim else " Write at least 500 words."
    cancel_prompts = [f"sign-off cancel probe {run_id}-{i}: tell a long story.{long}" for i in range(m)]
    deadline = time.monotonic() + bound
    cancels = many("cancel run", cancel_prompts, m, deadline, lambda p: stream_once(gw, provider, p, True, deadline))
    counted_by = time.monotonic() + 10.0
    arrived = 0
    while True:  # the Pool's records reach Metrics in batches: wait for all M, bounded
        arrived = int(cancel_count(gw) - before)
        if arrived >= m or time.monotonic() > counted_by:
            break
        time.sleep(0.1)
    cancel_p95 = gw.performance(arrived)["cancel_ms"]["p95"] if arrived > 0 else None
    if arrived < m:
        progress(f"  only {arrived} of {m} cancels were measured ({sum(1 for r in cancels if r['ok'])} streams cut)")

    ttft_ok = ttft_p95 is not None and ttft_p95 <= TTFT_TARGET_MS and not failed
    cancel_ok = cancel_p95 is not None and cancel_p95 < CANCEL_TARGET_MS
    queue_ok = queue_p95 is not None and queue_p95 <= QUEUE_WAIT_OK_MS
    lines = [
        f"• TTFT (streaming) p95: {_ms(ttft_p95)} ms (target ≤ 1,500 ms) — {'PASS' if ttft_ok else 'FAIL'}",
        f"• Cancel latency: {_ms(cancel_p95)} ms (target < 300 ms) — {'PASS' if cancel_ok else 'FAIL'}",
        f"• Queue wait p95 (TTFT run): {_ms(queue_p95)} ms — {'OK (≈0)' if queue_ok else 'INVESTIGATE'}",
    ]
    return lines, ttft_ok and cancel_ok, note


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value):,}"


def record(path: Path, lines: list[str], passed: bool, url: str, note: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    entry = [f"### {stamp} — {'PASS' if passed else 'FAIL'}", "", f"Gateway {url}; {note}.", "", "```", *lines, "```", ""]
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("# Phase 1 Go/No-Go\n\n## Sign-off runs\n\n")
        f.write("\n".join(entry) + "\n")


# --- selfcheck: a whole sign-off on a gateway of our own ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def selfcheck(record_path: Path | None) -> int:
    port, actor_port, token = _free_port(), _free_port(), secrets.token_urlsafe(24)
    tmp = tempfile.mkdtemp(prefix="sluice-signoff-")
    env = {**os.environ, "SLUICE_PORT": str(port), "SLUICE_ACTOR_PORT": str(actor_port), "SLUICE_HOST": "127.0.0.1",
           "SLUICE_PROVIDER": "simulated", "SLUICE_ADMIN_TOKEN": token, "SLUICE_LOG_LEVEL": "WARNING",
           "SLUICE_DB": os.path.join(tmp, "sluice.sqlite3")}
    log = open(os.path.join(tmp, "gateway.log"), "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    gw = Gateway(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SuiteError(f"the gateway exited with {proc.returncode}; log: {log.name}")
            try:
                if gw.call("GET", "/readyz", timeout=2)[0] == 200:
                    break
            except SuiteError:
                pass
            if time.monotonic() > deadline:
                raise SuiteError(f"the gateway was not ready within 60 s; log: {log.name}")
            time.sleep(0.1)
        progress(f"selfcheck: gateway on {gw.url}, simulated provider, ports {port}/{actor_port}")
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the three lines only
            prep(gw, None)
        try:
            lines, passed, note = run(gw, None)
        finally:
            with contextlib.redirect_stdout(sys.stderr):
                restore(gw, None)
        print("\n".join(lines))
        if record_path:
            record(record_path, lines, passed, gw.url, note)
        return 0 if passed else 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- entry point ------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8")  # the result lines have • ≤ — in any locale
    parser = argparse.ArgumentParser(prog="ttft_suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prep", "run", "restore", "selfcheck"))
    parser.add_argument("targets", nargs="*", metavar="URL|ACCOUNT",
                        help="the gateway URL (http...) and/or the pacer account under test")
    parser.add_argument("--exports", help="write shell export lines here (for a sourcing shell)")
    args = parser.parse_intermixed_args(argv)
    url = os.environ.get("SLUICE_URL") or DEFAULT_URL
    account = os.environ.get("SLUICE_SIGNOFF_ACCOUNT") or None
    for word in args.targets:
        if word.startswith(("http://", "https://")):
            url = word
        else:
            account = word
    recording = os.environ.get("SLUICE_SIGNOFF_RECORD", str(ROOT / "PHASE1_GO_NO_GO.md"))
    record_path = None if recording.lower() in ("", "none", "-") else Path(recording)
    gw = Gateway(url, os.environ.get("SLUICE_ADMIN_TOKEN") or None)
    try:
        if args.command == "selfcheck":
            return selfcheck(record_path if "SLUICE_SIGNOFF_RECORD" in os.environ else None)
        if args.command == "run":
            lines, passed, note = run(gw, account)
            print("\n".join(lines), flush=True)
            if record_path:
                record(record_path, lines, passed, url, note)
                progress(f"recorded in {record_path}")
            return 0 if passed else 1
        exports = (prep if args.command == "prep" else restore)(gw, account)
        if args.exports:
            Path(args.exports).write_text("\n".join(exports) + "\n")
        return 0
    except SuiteError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    finally:
        gw.pool.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
