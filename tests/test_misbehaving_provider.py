"""A provider (and clients) misbehaving against the newer paths: two edge workers
(SLUICE_WORKERS=2), two Pools (SLUICE_POOLS=2), and every streaming front end --
/v1/chat/completions, /v1/messages, /v1/responses and /api/chat -- at once, coalesced
followers spread over both workers.

Each burst sends, on every front end, 3 identical clients (one coalesced call) and 3
distinct ones, each on a fresh connection (the kernel spreads them over the workers). Every
client must get either the whole answer or exactly one terminal error, last, in its front
end's own format (an OpenAI error chunk and no [DONE]; Anthropic's `event: error` and no
message_stop; Responses' `response.failed`; sluice's error event), against a deadline of
its own (no hang); after each burst every Pacer is idle again and the gateway keeps serving.

Faults (sim/formats.py): a 200 whose body is an error JSON or an HTML page (retried like
the 502 it stands for), a stream that stops without its terminator, GOAWAY mid-stream, a
token of 3 MB, keepalives and nothing else after a few tokens (timed out like silence), a provider that accepts the connection and never answers (`SilentPort`),
and a burst of clients leaving right after their 200 (every upstream call must be reset).
Real processes throughout (`Gateway`, the simulated provider). docs/reliability.md,
"Probed" lists what was tried.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpcore
import pytest

from protocols.sse import SSEParser
from sim import formats
from tests.support import SSEClient, get_json, request, running_gateway, running_sim, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "misbehave-admin-token"
TOKENS = 5
DEADLINE_S = 30.0  # no client may wait longer than this for its terminal event
READ_TIMEOUT_S = 1.0  # UPSTREAM_READ_TIMEOUT_S: a stall is an error (or a retry) after this
FRONT_ENDS = ("openai", "anthropic", "responses", "sluice")
BODY_TIMEOUT_S = 1.0  # SLUICE_BODY_TIMEOUT_S: a body not whole by then is a 408


class SilentPort:
    """A provider that accepts connections (the kernel does, into the backlog) and never
    reads or answers a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def gw():
    with ExitStack() as stack:
        sim = stack.enter_context(running_sim())
        silent = SilentPort()
        stack.callback(silent.close)
        fast = {"RPS": "500", "BURST": "500", "CONCURRENCY": "200", "RPM": "0"}
        env = {
            "SIMULATED_BASE_URL": sim,
            "SLUICE_ADMIN_TOKEN": TOKEN,
            "SLUICE_WORKERS": "2",
            "SLUICE_POOLS": "2",
            "UPSTREAM_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
            "UPSTREAM_RETRY_MIN": "1000",  # bursts that all fail at once: see test_upstream_retries
            "CIRCUIT_FAILURES": "0",  # rows share the gateway: no breaker opened by an earlier row
            "SLUICE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "OPENAI_BASE_URL": f"http://127.0.0.1:{silent.port}",
            "OPENAI_API_KEY": "k",
            "OPENAI_H2C": "1",
            "ANTHROPIC_BASE_URL": sim,  # an account of its own that a long 429 pauses
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_H2C": "1",
            "OLLAMA_BASE_URL": sim,  # NDJSON, over HTTP/1.1 (no OLLAMA_H2C)
            **{f"{a}_{k}": v for a in ("SIMULATED", "OPENAI", "ANTHROPIC", "OLLAMA") for k, v in fast.items()},
        }
        gateway = stack.enter_context(running_gateway(env))
        gateway.sim = sim
        wait_both_serve(gateway)
        gateway.workers_seen = Counter()  # clients each worker served (the kernel picks)
        yield gateway
        if sum(gateway.workers_seen.values()) >= 100:  # the whole module ran: both took part
            assert set(gateway.workers_seen) == {"1", "2"}, gateway.workers_seen
        assert request("GET", gateway.url + "/readyz")[0] == 200


@pytest.fixture(autouse=True)
def pacers_idle_after(gw):
    yield
    wait_until(lambda: pacers_idle(gw), timeout=20, message="every Pacer idle")


def wait_both_serve(gw) -> None:
    seen: set[str] = set()

    def both() -> bool:
        status, headers, _ = request("GET", gw.url + "/readyz", headers={"connection": "close"})
        if status == 200:
            seen.add(headers["x-sluice-worker"])
        return seen == {"1", "2"}

    wait_until(both, timeout=30, interval=0.01, message="both workers ready")


def pacers_idle(gw) -> bool:
    status, _, raw = request(
        "GET", gw.url + "/api/admin/state?role=pacer", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, raw
    return all(p["in_flight"] == 0 and p["queue_depth"] == 0 for p in json.loads(raw)["results"].values())


# --- one client, in its front end's format ---------------------------------------------------


def front_end_request(front_end: str, text: str, provider: str = "simulated") -> tuple[str, dict]:
    messages = [{"role": "user", "content": text}]
    if front_end == "openai":
        return "/v1/chat/completions", {"model": provider, "stream": True, "messages": messages}
    if front_end == "anthropic":
        return "/v1/messages", {"model": provider, "max_tokens": 1000, "stream": True, "messages": messages}
    if front_end == "responses":
        return "/v1/responses", {"model": provider, "stream": True, "input": text}
    return "/api/chat", {"provider": provider, "messages": messages}


class Answer:
    """One client's stream read to its end (against DEADLINE_S) and judged in its front
    end's format: `outcome` is "done" or the error's code (Anthropic: its type), `text` the
    answer's text, `message` the error's message. Asserts exactly one terminal, last."""

    def __init__(self, gw, front_end: str, text: str, provider: str = "simulated"):
        path, body = front_end_request(front_end, text, provider)
        t = {"connect": DEADLINE_S, "read": DEADLINE_S, "write": DEADLINE_S, "pool": DEADLINE_S}
        started, raw = time.monotonic(), b""
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        with (
            httpcore.ConnectionPool() as pool,
            pool.stream(
                "POST", gw.url + path, headers=headers, content=json.dumps(body).encode(), extensions={"timeout": t}
            ) as response,
        ):
            self.status = response.status
            self.worker = dict(response.headers).get(b"x-sluice-worker", b"").decode()
            for chunk in response.iter_stream():
                raw += chunk
                if time.monotonic() - started > DEADLINE_S:
                    break  # a hang (sluice's keepalive pings keep the read alive): judged below
        self.seconds = time.monotonic() - started
        assert self.seconds < DEADLINE_S
        self.front_end = front_end
        self.text, self.message = "", ""
        if self.status != 200:  # refused before the stream: the front end's error JSON
            error = json.loads(raw)["error"]
            self.message, self.outcome = error["message"], error["type" if front_end == "anthropic" else "code"]
            return
        self.events = [e for e in SSEParser().feed(raw) if e.event != "ping"]
        self.outcome = getattr(self, "_" + front_end)()

    def _openai(self) -> str:
        data = [e.data for e in self.events]
        chunks = [json.loads(d) for d in data if d != "[DONE]"]
        errors = [c for c in chunks if "error" in c]
        self.text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        if errors:
            assert len(errors) == 1 and data[-1] != "[DONE]" and json.loads(data[-1]) == errors[0], data[-3:]
            self.message = errors[0]["error"]["message"]
            return errors[0]["error"]["code"]
        assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, data[-3:]
        return "done"

    def _anthropic(self) -> str:
        names = [e.event for e in self.events]
        self.text = "".join(
            json.loads(e.data)["delta"].get("text", "") for e in self.events if e.event == "content_block_delta"
        )
        if "error" in names:
            assert names.count("error") == 1 and names[-1] == "error" and "message_stop" not in names, names[-3:]
            error = json.loads(self.events[-1].data)["error"]
            self.message = error["message"]
            return error["type"]
        assert names[-1] == "message_stop" and names.count("message_stop") == 1, names[-3:]
        return "done"

    def _responses(self) -> str:
        data = [json.loads(e.data) for e in self.events]
        kinds = [d["type"] for d in data]
        self.text = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
        ends = [k for k in kinds if k in ("response.completed", "response.failed", "response.incomplete", "error")]
        assert ends == [kinds[-1]], kinds[-3:]
        if kinds[-1] == "response.failed":
            error = data[-1]["response"]["error"]
            self.message = error["message"]
            return error["code"]
        assert kinds[-1] == "response.completed", kinds[-3:]
        return "done"

    def _sluice(self) -> str:
        data = [json.loads(e.data) for e in self.events if e.event == "message"]
        ends = [d for d in data if d["type"] in ("done", "error")]
        assert ends == [data[-1]], data[-3:]
        self.text = "".join(d["delta"] for d in data if d["type"] == "delta")
        if data[-1]["type"] == "error":
            self.message = data[-1]["message"]
            return data[-1]["code"]
        return "done"


def burst(gw, directive: str, provider: str = "simulated", identical_ttft_ms: int = 600) -> list[tuple[str, Answer]]:
    """On every front end, 3 identical clients (their answer starts late, so they join one
    flight) and 3 distinct ones, all at once: [(the prompt, its Answer)]."""
    tag = uuid.uuid4().hex[:8]
    jobs = []
    for front_end in FRONT_ENDS:
        same = f"same {tag} {front_end}:\n#sim {directive} tokens={TOKENS} ttft_ms={identical_ttft_ms}"
        jobs += [(front_end, same)] * 3
        jobs += [(front_end, f"distinct {tag} {front_end} {i}:\n#sim {directive} tokens={TOKENS}") for i in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: Answer(gw, *job, provider=provider), jobs))
    gw.workers_seen.update(a.worker for a in answers)
    return [(text, answer) for (_, text), answer in zip(jobs, answers)]


def answer_text(prompt: str) -> str:
    return "".join(formats.make_tokens([{"role": "user", "content": prompt}], TOKENS))


def calls_for(gw, marker: str) -> list[dict]:
    return [r for r in get_json(gw.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]


# --- a 200 that is not a stream ---------------------------------------------------------------


@pytest.mark.parametrize("fault", ["json_200", "html_200"])
def test_a_200_that_is_not_a_stream_is_retried_and_no_client_sees_it(gw, fault):
    for prompt, answer in burst(gw, f"fail={fault} fail_times=1"):
        assert answer.outcome == "done", (answer.front_end, answer.message)
        if answer.front_end != "anthropic":  # the Anthropic format carries the prompt its own way
            assert answer.text == answer_text(prompt)
        assert len(calls_for(gw, prompt.split(":")[0] + ":")) == 2  # the page, then the answer


@pytest.mark.parametrize(("fault", "page"), [("json_200", "application/json"), ("html_200", "text/html")])
def test_a_200_that_is_never_a_stream_is_one_clear_error(gw, fault, page):
    for _, answer in burst(gw, f"fail={fault}"):
        assert answer.outcome == ("api_error" if answer.front_end == "anthropic" else "upstream_5xx"), answer.message
        assert f"200 with {page}, not a stream" in answer.message
        if fault == "json_200":  # the provider's own words are kept
            assert "simulated, sent as 200" in answer.message


# --- faults after the first byte: one error each, in each front end's format ------------------

AFTER_THE_FIRST_BYTE = [
    pytest.param("fail=no_done", "upstream_truncated", id="no-terminator-clean-close"),
    pytest.param("fail=goaway_mid", "upstream_reset", id="goaway-mid-stream"),
    pytest.param("fail=reset_mid", "upstream_reset", id="rst-stream-mid-stream"),
    pytest.param("fail=malformed", "upstream_malformed", id="malformed-sse"),
    pytest.param("fail=stall", "upstream_timeout", id="stall-mid-stream"),
    # bytes keep coming, none of them a frame: clients waited forever (sluice's pings too)
    pytest.param("fail=keepalive_only token_interval_ms=100", "upstream_timeout", id="keepalives-only"),
]


@pytest.mark.parametrize(("directive", "code"), AFTER_THE_FIRST_BYTE)
def test_a_fault_after_the_first_byte_is_one_error_in_each_front_ends_format(gw, directive, code):
    for _, answer in burst(gw, directive):
        expected = {"anthropic": ("api_error", "timeout_error", "overloaded_error")}.get(answer.front_end, (code,))
        assert answer.outcome in expected, (answer.front_end, answer.outcome, answer.message)
        assert answer.message


HTTP1_ROWS = [
    pytest.param("fail=json_200 fail_times=1", "done", id="json-200-once"),
    pytest.param("fail=no_done", "upstream_truncated", id="no-terminator"),
    pytest.param("fail=goaway_mid", "upstream_reset", id="connection-closed-mid-stream"),
    pytest.param("fail=keepalive_only token_interval_ms=100", "upstream_timeout", id="keepalives-only"),
    pytest.param("fail=huge_frame", "done", id="3-mb-token"),
]


@pytest.mark.parametrize(("directive", "outcome"), HTTP1_ROWS)
def test_an_ndjson_provider_over_http1_misbehaving_the_same_ways(gw, directive, outcome):
    """Ollama's NDJSON over HTTP/1.1 (a cancel closes the connection; keepalives are empty
    lines): the same outcomes as SSE over HTTP/2."""
    for _, answer in burst(gw, directive, provider="ollama"):
        expected = (
            {"api_error", "timeout_error"} if answer.front_end == "anthropic" and outcome != "done" else {outcome}
        )
        assert answer.outcome in expected, (answer.front_end, answer.outcome, answer.message)
    assert {r["protocol"] for r in get_json(gw.sim + "/stats")[1]["requests"] if r["path"] == "/api/chat"} == {
        "http/1.1"
    }


def test_a_token_of_several_mb_arrives_whole_on_every_front_end(gw):
    for _, answer in burst(gw, "fail=huge_frame fail_after_tokens=2"):
        assert answer.outcome == "done", (answer.front_end, answer.message)
        assert "x" * formats.HUGE_TOKEN_BYTES in answer.text


def test_a_provider_that_never_answers_is_one_timeout_error(gw):
    """OPENAI points at a port that accepts and never answers: every attempt times out."""
    for _, answer in burst(gw, "fail=none", provider="openai"):
        expected = "timeout_error" if answer.front_end == "anthropic" else "upstream_timeout"
        assert answer.outcome in (expected, "api_error"), (answer.front_end, answer.outcome, answer.message)


def test_a_429_pausing_the_account_past_the_max_wait_is_told_at_once(gw):
    """Retry-After 60 s (past the retry deadline and the Pacer's 30 s max wait): the first
    client gets the 429 at once, and so does everyone after it while the account is paused,
    on every front end -- none waits 30 s for a 429 that is certain (they did)."""
    first = Answer(gw, "sluice", f"pause {uuid.uuid4().hex}:\n#sim fail=429 retry_after_s=60", provider="anthropic")
    assert first.outcome == "upstream_429", first.message
    answers = [answer for _, answer in burst(gw, "fail=none", provider="anthropic")]
    told = []
    for answer in answers:
        assert answer.seconds < 10, (answer.front_end, answer.outcome, answer.seconds)
        if answer.outcome == "done":
            continue  # a lease slice a shard used before the pause's recall reached it
        expected = "rate_limit_error" if answer.front_end == "anthropic" else "pacer_queue_timeout"
        assert answer.outcome == expected and "Retry-After" in answer.message, (answer.front_end, answer.message)
        told.append(answer)
    assert len(told) >= len(answers) // 2, [(a.front_end, a.outcome) for a in answers]


# --- clients that leave ---------------------------------------------------------------------


def test_clients_leaving_right_after_their_200_abort_every_upstream_call(gw):
    """20 distinct and 20 identical streams on /v1/chat/completions over both workers, each
    closed as soon as its 200 arrived, while the provider still holds back its response
    headers (headers_ms): every call that reached the provider is reset there, none goes
    on generating (it did: httpcore forgot a stream given up before its headers)."""
    tag = uuid.uuid4().hex[:8]
    long = "#sim tokens=400 token_interval_ms=50 headers_ms=1500"  # 21.5 s: only a reset ends it in time
    texts = [f"leave {tag} {i}:\n{long}" for i in range(20)] + [f"leave {tag} same:\n{long} ttft_ms=300"] * 20

    def open_stream(text: str) -> SSEClient:
        body = {"model": "simulated", "stream": True, "messages": [{"role": "user", "content": text}]}
        return SSEClient(gw.url + "/v1/chat/completions", body, headers={"connection": "close"})

    with ThreadPoolExecutor(len(texts)) as pool:
        clients = list(pool.map(open_stream, texts))
        gw.workers_seen.update(c.headers["x-sluice-worker"] for c in clients)
        wait_until(lambda: len(calls_for(gw, f"leave {tag}")) == 21, timeout=10, message="every call sent")
        list(pool.map(lambda c: c.close(), clients))

    def still_generating() -> list[dict]:
        return [r for r in calls_for(gw, f"leave {tag}") if r["outcome"] != "cancelled"]

    wait_until(lambda: not still_generating(), timeout=10, message="every upstream call reset")


# --- clients that send bad input --------------------------------------------------------------

USER = [{"role": "user", "content": "x"}]
BAD_INPUT = [
    # (path, body, status, words the error message must hold)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 422, "JSON object"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper"),
    ("/v1/chat/completions", b'{"model": "simulated", "messages": ' + b'"x' * 700_000 + b'"}', 413, "limit"),
    ("/v1/chat/completions", {"model": "simulated", "messages": "hi"}, 422, "'messages'"),
    ("/v1/chat/completions", {"model": 5, "messages": USER}, 422, "'model'"),
    ("/v1/chat/completions", {"model": "simulated", "stream": "yes", "messages": USER}, 422, "'stream'"),
    (
        "/v1/chat/completions",
        {"model": "simulated", "stream": True, "stream_options": {"include_usage": "yes"}, "messages": USER},
        422,
        "'stream_options.include_usage' must be true or false",
    ),
    (
        "/v1/messages",
        {"model": "simulated", "max_tokens": 9, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        400,
        "messages[0].content[0].text: must be a string",
    ),
    (
        "/v1/messages",
        {"model": "simulated", "max_tokens": 9, "messages": [{"role": "user", "content": [5]}]},
        400,
        "messages[0].content[0]: must be a content block",
    ),
    (
        "/v1/responses",
        {"model": "simulated", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        422,
        "input[0].content[0].text: must be a string",
    ),
    (
        "/v1/responses",
        {"model": "simulated", "input": [{"role": "user", "content": [5]}]},
        422,
        "input[0].content[0]: must be a content part",
    ),
]


BAD_INPUT_IDS = [
    "not-json",
    "an-array",
    "nested-100000-deep",
    "1.4-MB",
    "messages-a-string",
    "model-a-number",
    "stream-a-string",
    "include-usage-a-string",
    "anthropic-text-block-without-text",
    "anthropic-block-not-an-object",
    "responses-input-text-without-text",
    "responses-part-not-an-object",
]


@pytest.mark.parametrize(("path", "body", "status", "words"), BAD_INPUT, ids=BAD_INPUT_IDS)
def test_bad_client_input_is_a_clear_error_on_either_worker(gw, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    for _ in range(2):  # fresh connections: either worker may answer
        got, headers, raw = request(
            "POST", gw.url + path, content, {"content-type": "application/json", "connection": "close"}
        )
        gw.workers_seen.update([headers["x-sluice-worker"]])
        error = json.loads(raw)["error"]
        assert got == status and words in error["message"], (got, error)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/api/chat", "/api/admin/flags"])
def test_a_body_that_never_ends_is_a_408_not_a_held_connection(gw, path):
    """Headers, then 9 of the 100 body bytes announced, then nothing: a 408 in the front
    end's error shape once SLUICE_BODY_TIMEOUT_S is up (the connection was held for ever;
    the admin routes read their bodies through the same reader)."""
    port = int(gw.url.rsplit(":", 1)[1])
    admin = path.startswith("/api/admin/")
    auth = f"authorization: Bearer {TOKEN}\r\n" if admin else ""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: 100\r\n\r\n"
        sock.sendall(head.encode() + b'{"model":')
        started, answer = time.monotonic(), b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < DEADLINE_S
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "not complete within 1 s" in error["message"]
    assert error.get("code", error.get("type")) in ("body_timeout", "request_timeout", "invalid_request_error")
    if admin:  # sluice's own shape, and the admin surface still answers
        assert error["code"] == "body_timeout", error
        status, _, raw = request("GET", gw.url + "/api/admin/state", headers={"authorization": f"Bearer {TOKEN}"})
        assert status == 200, raw
