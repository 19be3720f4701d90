"""Issue 11's fault matrix, the rows tests/test_upstream_retries.py does not cover: each
fault x {1 client, 20 identical clients, 20 distinct clients}, in one burst of 41.

Where a retry can succeed (connection refused until the provider's port opens, a
connection reset as it opens, a stall before the first byte once) every client gets the
whole answer and no error. Where it cannot (refused throughout, a stall every time, a
reset or a stall after three tokens, a malformed frame, a body cut inside a UTF-8
character) every client gets exactly one terminal error event with a clear code. Every
client reads against a deadline of its own (no stream hangs), the Pacers' leases and
queues return to 0, and a chat thread's reply is stored as "done" or "error", never lost.

Real processes: run.py against the simulated provider over HTTP/2. "Connection refused"
needs a port that refuses and later accepts: `PortGate` holds a bound socket that does
not listen (the kernel refuses every connect), and on `open()` listens and forwards to the
simulated provider (optionally resetting the first connections it accepts). Each gated
account (OPENAI, ANTHROPIC, PERPLEXITY) has a gate of its own, so no pooled connection of
another row gets in the way. Each row prints one `matrix:` line per client shape
(docs/reliability.md, "Fault matrix" has the figures).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpcore
import pytest

from protocols.sse import SSEParser
from sim import formats
from tests.support import get_json, request, running_gateway, running_sim, wait_until

TOKEN = "fault-matrix-admin-token"
TOKENS = 6
READ_TIMEOUT_S = 2.0  # UPSTREAM_READ_TIMEOUT_S: how long a stall lasts before it is an error
BACKOFF_S = 1.0  # UPSTREAM_RETRY_BACKOFF_S: room to open a refusing port between two attempts
ACCOUNTS = ("simulated", "openai", "anthropic", "perplexity")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class PortGate:
    """A loopback port that refuses connections until `open()`, then forwards each one to
    `target_port` (the first `reset_first` it accepts are reset at once instead)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        self.port = self.listener.getsockname()[1]
        self.accepted = self.reset = 0
        self.reset_left = 0
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False

    def open(self, reset_first: int = 0) -> None:
        self.reset_left = reset_first
        self.listener.listen(128)
        self.listener.settimeout(0.1)
        self._thread(self._accept)

    def _thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.reset_left > 0:
                self.reset_left -= 1
                self.reset += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [conn, upstream]
            self._thread(self._pump, conn, upstream)
            self._thread(self._pump, upstream, conn)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        for sock in [*self.sockets, self.listener]:
            sock.close()


@pytest.fixture(scope="module")
def gw():
    with ExitStack() as stack:
        sim = stack.enter_context(running_sim())
        sim_port = int(sim.rsplit(":", 1)[1])
        gates = {name: PortGate(sim_port) for name in ("openai", "anthropic", "perplexity")}
        for gate in gates.values():
            stack.callback(gate.close)
        fast = {"RPS": "200", "BURST": "200", "CONCURRENCY": "100", "RPM": "0"}
        env = {
            "SIMULATED_BASE_URL": sim,
            "SLUICE_ADMIN_TOKEN": TOKEN,
            "UPSTREAM_RETRY_MIN": "1000",  # bursts of 22 calls that all fail at once: see test_upstream_retries
            "UPSTREAM_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
            "UPSTREAM_RETRY_BACKOFF_S": str(BACKOFF_S),
            # Rows share the gateway: a breaker opened by one row's failures would answer the
            # next rows 503 before they reach their fault (breakers: tests/test_failover.py).
            "CIRCUIT_FAILURES": "0",
            **{f"SIMULATED_{k}": v for k, v in fast.items()},
        }
        for name, gate in gates.items():
            prefix = name.upper()
            env |= {
                f"{prefix}_BASE_URL": f"http://127.0.0.1:{gate.port}",
                f"{prefix}_API_KEY": "k",
                f"{prefix}_H2C": "1",
            }
            env |= {f"{prefix}_{k}": v for k, v in fast.items()}
        gateway = stack.enter_context(running_gateway(env))
        gateway.sim, gateway.gates = sim, gates
        yield gateway
        for account in ACCOUNTS:
            wait_until(lambda: pacer_idle(gateway, account), timeout=20, message=f"pacer:{account} idle")


# --- helpers ------------------------------------------------------------------------------------


class Answer:
    """One client's stream, read as raw bytes against a deadline."""

    def __init__(self, url: str, body: dict, deadline_s: float):
        started = time.monotonic()
        raw, self.status = b"", None
        t = {"connect": deadline_s, "read": deadline_s, "write": deadline_s, "pool": deadline_s}
        with (
            httpcore.ConnectionPool() as pool,
            pool.stream(
                "POST",
                url,
                headers=[(b"content-type", b"application/json")],
                content=json.dumps(body).encode(),
                extensions={"timeout": t},
            ) as response,
        ):
            self.status = response.status
            for chunk in response.iter_stream():
                raw += chunk
                if time.monotonic() - started > deadline_s:
                    break
        self.ended_at = time.monotonic()
        self.seconds = self.ended_at - started
        self.deadline_s = deadline_s
        self.text = raw.decode("utf-8")  # strict: what a client gets must be valid UTF-8
        events = SSEParser().feed(raw)
        assert events and events[0].event == "ping", raw[:200]
        self.data = [json.loads(e.data) for e in events if e.event == "message"]

    @property
    def deltas(self) -> list[str]:
        return [d["delta"] for d in self.data if d["type"] == "delta"]

    @property
    def terminal(self) -> list[dict]:
        return [d for d in self.data if d["type"] in ("done", "error")]

    @property
    def attempts(self) -> int:
        """The meta event says how many attempts delivered; an error after retries too."""
        for d in self.data:
            if d["type"] == "meta" and "attempts" in d:
                return d["attempts"]
        return self.terminal[-1].get("attempts", 1) if self.terminal else 0


def burst(gw, provider: str, directive: str, deadline_s: float, ttft_ms: int = 600):
    """1 + 20 identical + 20 distinct clients at once: {shape: [(text, Answer)]}. The
    identical clients' answer starts `ttft_ms` late, so all 20 join the one flight."""
    tag = uuid.uuid4().hex[:8]
    shapes = {
        "1 client": [f"one {tag}:\n#sim {directive} tokens={TOKENS}"],
        "20 identical": [f"same {tag}:\n#sim {directive} tokens={TOKENS} ttft_ms={ttft_ms}"] * 20,
        "20 distinct": [f"distinct {tag} {i}:\n#sim {directive} tokens={TOKENS}" for i in range(20)],
    }
    texts = [text for group in shapes.values() for text in group]

    def ask(text: str) -> Answer:
        body = {"provider": provider, "messages": [{"role": "user", "content": text}]}
        return Answer(gw.url + "/api/chat", body, deadline_s)

    sent_at = time.monotonic()
    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(ask, texts))
    for answer in answers:
        # From the burst's start: a client thread started late on a loaded box joins a call
        # that has been stalling since before it asked (its own clock would start too late).
        answer.since_burst = answer.ended_at - sent_at
    ordered = iter(answers)
    return {shape: [(text, next(ordered)) for text in group] for shape, group in shapes.items()}


def report(row: str, results: dict) -> None:
    for shape, answers in results.items():
        codes = sorted({a.terminal[-1].get("code", "done") for _, a in answers if a.terminal})
        errors = sum(1 for _, a in answers if any(d["type"] == "error" for d in a.data))
        attempts = sorted({a.attempts for _, a in answers})
        slowest = max(a.seconds for _, a in answers)
        print(
            f"matrix: {row} | {shape}: clients={len(answers)} errors={errors} terminal={codes} "
            f"attempts={attempts} slowest_terminal_s={slowest:.2f}"
        )


def assert_no_hang(results: dict) -> None:
    for _, answers in results.items():
        for _, answer in answers:
            assert answer.status == 200
            assert answer.seconds < answer.deadline_s, f"a stream ran past its deadline: {answer.data[-3:]}"
            assert answer.terminal == [answer.data[-1]], answer.data[-3:]  # exactly one, and last


def assert_whole_answers(results: dict, attempts: set[int]) -> None:
    assert_no_hang(results)
    for _, answers in results.items():
        for text, answer in answers:
            assert answer.data[-1]["type"] == "done", answer.data[-3:]
            assert answer.deltas == formats.make_tokens([{"role": "user", "content": text}], TOKENS)
            assert answer.attempts in attempts, (answer.attempts, attempts)


def assert_one_error_each(results: dict, code: str, deltas: int = 0, attempts: int = 1) -> None:
    assert_no_hang(results)
    for _, answers in results.items():
        for text, answer in answers:
            assert answer.data[-1]["type"] == "error" and answer.data[-1]["code"] == code, answer.data[-3:]
            assert answer.deltas == formats.make_tokens([{"role": "user", "content": text}], TOKENS)[:deltas]
            assert answer.attempts == attempts, answer.data


def sim_calls(gw, marker: str) -> list[dict]:
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


def admin(gw, path: str) -> dict:
    status, _, raw = request("GET", gw.url + path, headers={"authorization": f"Bearer {TOKEN}"})
    assert status == 200, raw
    return json.loads(raw)


def pacer_idle(gw, account: str) -> bool:
    pacer = admin(gw, f"/api/admin/state?role=pacer:{account}")["results"][f"pacer:{account}"]
    return pacer["in_flight"] == 0 and pacer["queue_depth"] == 0


def assert_pacers_idle(gw) -> None:
    for account in ACCOUNTS:
        wait_until(lambda: pacer_idle(gw, account), timeout=15, message=f"pacer:{account}'s leases and queue back to 0")


def retries_total(gw, provider: str, reason: str) -> float:
    _, _, raw = request("GET", gw.url + "/metrics")
    found = re.search(
        rf'sluice_upstream_retries_total\{{provider="{provider}",reason="{reason}"\}} (\S+)', raw.decode()
    )
    return float(found.group(1)) if found else 0.0


# --- faults a retry fixes -------------------------------------------------------------------------


def test_connection_refused_until_the_port_opens_is_retried(gw):
    """Every call is refused at first; the port opens between the first and the second
    attempt (backoff 0.5-1 s), or at the latest before the third (1-2 s later)."""
    gate = gw.gates["openai"]
    before = retries_total(gw, "openai", "connect")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(burst, gw, "openai", "", 20.0)
        # 22 upstream calls (1 + 1 coalesced + 20) refused once each: now open the port
        wait_until(
            lambda: retries_total(gw, "openai", "connect") - before >= 22, timeout=20, message="every call refused once"
        )
        gate.open()
        results = pending.result()
    report("connection refused, then the port opens", results)
    assert_whole_answers(results, attempts={2, 3})
    assert_pacers_idle(gw)


def test_a_connection_reset_as_it_opens_is_retried(gw):
    """The provider's side accepts and resets the first connection (RST before any byte)."""
    gate = gw.gates["perplexity"]
    gate.open(reset_first=1)
    results = burst(gw, "perplexity", "", 20.0)
    report("connection reset as it opens", results)
    assert gate.reset == 1
    assert_whole_answers(results, attempts={1, 2})
    assert any(a.attempts == 2 for answers in results.values() for _, a in answers)  # the reset was met
    assert_pacers_idle(gw)


def test_a_stall_before_the_first_byte_is_retried_once(gw):
    """The first call of each body sends nothing at all; after the read timeout the Pool
    tries again at once and the second call answers."""
    before = retries_total(gw, "simulated", "timeout")
    results = burst(gw, "simulated", "fail=stall_first fail_times=1", deadline_s=READ_TIMEOUT_S + 15)
    report("stall before the first byte, once per body", results)
    assert_whole_answers(results, attempts={2})
    for shape, answers in results.items():
        assert all(a.since_burst >= READ_TIMEOUT_S for _, a in answers)  # it did wait out the stall
        marker = answers[0][0].split("\n")[0]
        assert [c["fail"] for c in sim_calls(gw, marker)][:2] == ["stall_first", "none"], shape
    wait_until(lambda: retries_total(gw, "simulated", "timeout") - before >= 22, timeout=10, message="retries counted")
    assert_pacers_idle(gw)


# --- faults a retry cannot fix --------------------------------------------------------------------


def test_connection_refused_throughout_gives_one_connect_error_each(gw):
    """ANTHROPIC's port never opens: three attempts (backoff 0.5-1 s, then 1-2 s), then
    one `upstream_connect` error event per client."""
    results = burst(gw, "anthropic", "", 20.0)
    report("connection refused throughout", results)
    assert_one_error_each(results, "upstream_connect", attempts=3)
    assert_pacers_idle(gw)


def test_a_stall_before_the_first_byte_every_time_gives_one_timeout_each(gw):
    results = burst(gw, "simulated", "fail=stall_first", deadline_s=3 * READ_TIMEOUT_S + 15)
    report("stall before the first byte, every call", results)
    assert_one_error_each(results, "upstream_timeout", attempts=3)
    for _, answers in results.items():
        assert all(a.since_burst >= 3 * READ_TIMEOUT_S for _, a in answers)
    assert_pacers_idle(gw)


MIDSTREAM = [
    # (the sim's fault after 3 tokens, the code every client ends with)
    pytest.param("fail=reset_mid", "upstream_reset", id="reset-after-3-tokens"),
    pytest.param("fail=stall", "upstream_timeout", id="stall-after-3-tokens"),
    pytest.param("fail=malformed", "upstream_malformed", id="malformed-sse"),
    pytest.param("fail=cut_utf8", "upstream_truncated", id="body-cut-mid-utf8"),
]


@pytest.mark.parametrize("fault, code", MIDSTREAM)
def test_a_fault_after_the_first_byte_gives_three_tokens_and_one_error_each(gw, fault, code):
    """No retry after the first byte: the three tokens already delivered stand, then one
    error event. The body cut inside a character: the text delivered is still valid
    UTF-8 (`Answer` decodes strictly) and holds no half character."""
    results = burst(gw, "simulated", f"{fault} fail_after_tokens=3", deadline_s=READ_TIMEOUT_S + 15)
    report(fault.replace("fail=", ""), results)
    assert_one_error_each(results, code, deltas=3, attempts=1)
    for _, answers in results.items():
        for _, answer in answers:
            assert "\ufffd" not in answer.text  # no replacement character either
        assert len(sim_calls(gw, answers[0][0].split("\n")[0])) == 1  # no retry
    assert_pacers_idle(gw)


# --- a chat thread's reply is stored whatever happens --------------------------------------------


@pytest.mark.parametrize(
    "directive, status, code",
    [
        ("fail=reset_mid fail_after_tokens=3", "error", "upstream_reset"),
        ("fail=reset_first fail_times=1", "done", None),
        ("fail=stall_first fail_times=1", "done", None),
    ],
)
def test_a_thread_reply_is_stored_complete_or_as_an_error_never_lost(gw, directive, status, code):
    status_code, _, raw = request("POST", gw.url + "/api/threads")
    assert status_code == 201, raw
    thread = json.loads(raw)["thread_id"]
    text = f"thread {uuid.uuid4().hex[:8]}:\n#sim {directive} tokens={TOKENS}"
    with ThreadPoolExecutor(5) as pool:  # five clients send the same turn at once
        answers = list(
            pool.map(
                lambda _: Answer(f"{gw.url}/api/threads/{thread}/messages", {"content": text}, READ_TIMEOUT_S + 15),
                range(5),
            )
        )
    for answer in answers:
        assert answer.terminal == [answer.data[-1]] and answer.data[-1]["type"] == (
            "done" if status == "done" else "error"
        )
    _, body = get_json(f"{gw.url}/api/threads/{thread}/messages")
    replies = [msg for msg in body["messages"] if msg["role"] == "assistant"]
    assert replies and all(r["status"] == status and r["error_code"] == code for r in replies), replies
    for reply in replies:
        assert reply["content"] == "".join(answers[0].deltas)
        assert len(answers[0].deltas) == (TOKENS if status == "done" else 3)
    print(f"matrix: thread {directive} -> {len(replies)} assistant message(s) stored as {status} {code or ''}")
    assert_pacers_idle(gw)
