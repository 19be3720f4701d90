"""Fuzz the running gateway with hostile bodies and headers: no 5xx, no hang, still healthy.

Generated with hypothesis: JSON-ish bodies (integers beyond 64 bits, deep nesting, lone
surrogates written as raw `"\\ud800"` escapes, NULs, NaN/Infinity, thousands of digits,
wrong types, random keys, truncated or garbled bytes) and header sets (content types,
content-length shorter or longer than the body), posted to every route that takes input:
/api/chat, /v1/chat/completions, /api/threads, /api/threads/{id}/messages and
/api/chat/{id}/cancel, and the admin POST routes (with a wrong or missing admin token:
a fuzzed body must never change a setting). Every GET route (chat-thread reads, metrics,
alerts, models, health, admin state) gets generated query strings, path parameters and
authorization headers. A case fails when the answer is a 5xx, when it does not come within
`DEADLINE_S`, or when a 200 event stream ends without its terminal event or with an
`internal_error` event.

tests/test_fuzz_bodies.py runs a few hundred cases against a test gateway; this script
runs as many as asked against a gateway of its own (10,000 by default, bounded by --max-s):

    .venv/bin/python -m bench.fuzz_bodies [--cases 10000] [--max-s 900] [--record]

It prints the count of each status (and of failures, with the first few bodies);
`--record` appends a line to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from hypothesis import strategies as st

DEADLINE_S = 20.0
ROUTES = (
    "/api/chat",
    "/v1/chat/completions",
    "/api/threads",
    "/api/threads/{thread}/messages",
    "/api/chat/{rid}/cancel",
)
KEYS = (
    "messages",
    "content",
    "role",
    "model",
    "provider",
    "thread_id",
    "coalesce",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "n",
    "tools",
    "response_format",
    "system",
    "include_usage",
    "on",
    "\x00",
    "",
)
# Admin routes: fuzzed with a wrong or missing token only (a valid one could drain the gateway).
ADMIN_POSTS = (
    "/api/admin/pacer/{rid}",
    "/api/admin/flags",
    "/api/admin/drain",
    "/api/admin/metrics/reset",
    "/api/admin/keys/reload",
    "/api/admin/alerts/thresholds",
)
GET_ROUTES = (
    "/api/threads/{thread}/messages",
    "/api/threads/{rid}/messages",
    "/api/metrics/performance",
    "/metrics",
    "/api/alerts",
    "/v1/models",
    "/v1/models/{rid}",
    "/healthz",
    "/readyz",
    "/api/admin/state",
    "/api/admin/alerts",
)
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    None,
    "application/x+json",
    "APPLICATION/JSON",
)

# --- generation ----------------------------------------------------------------------------------

big_ints = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    big_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.text(alphabet='\x00\n"\\é漢🙂', max_size=10),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool"]), values),
        "content": st.one_of(st.text(max_size=40).map(lambda t: t + "\n#sim tokens=2 token_interval_ms=0"), values),
    },
    optional={"extra": values, "name": values},
)
chatish = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), values)},
    optional=dict.fromkeys(
        (
            "model",
            "provider",
            "temperature",
            "seed",
            "max_tokens",
            "stop",
            "stream",
            "coalesce",
            "thread_id",
            "response_format",
            "n",
            "stream_options",
        ),
        values,
    ),
)
thread_send = st.fixed_dictionaries(
    {"content": st.one_of(st.text(max_size=40), values)}, optional={"provider": values, "model": values}
)
documents = st.one_of(chatish, thread_send, values, st.dictionaries(st.sampled_from(KEYS), values, max_size=5))


def _mutate(raw: bytes, how: str, where: float) -> bytes:
    at = int(len(raw) * where)
    if how == "surrogate":  # a lone surrogate as JSON writes it: valid JSON, not valid Unicode
        i = raw.find(b'"', at)
        return raw if i < 0 else raw[: i + 1] + b"\\ud800" + raw[i + 1 :]
    if how == "digits":
        return raw.replace(b"0", b"9" * 5000, 1) if b"0" in raw else b'{"seed": ' + b"7" * 5000 + b"}"
    if how == "deep":
        return b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    if how == "deep_open":
        return b"[" * 100_000
    if how == "truncate":
        return raw[:at]
    if how == "garble":
        return raw[:at] + b"\xff\xfe\x00" + raw[at:]
    if how == "nul":
        return raw.replace(b'"', b'"\\u0000', 1)
    return raw


header_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), max_size=40
)
queries = st.one_of(
    st.none(),
    st.builds(lambda k, v: f"{k}={quote(v)}", st.sampled_from(["last_n", "role", "n", "x", ""]), st.text(max_size=30)),
    st.sampled_from(
        [
            "last_n=-1",
            "last_n=0",
            "last_n=1e309",
            "last_n=99999999999999999999",
            "last_n=nan",
            "role=pacer",
            "role=../../etc",
            "last_n=1&last_n=2",
            "%zz",
            "=&=&",
        ]
    ),
)
cases = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["POST"] * 6 + ["GET"] * 3 + ["ADMIN"]),
        "route": st.sampled_from(ROUTES),
        "get_route": st.sampled_from(GET_ROUTES),
        "admin_route": st.sampled_from(ADMIN_POSTS),
        "query": queries,
        "authorization": st.one_of(st.none(), header_text, header_text.map(lambda t: "Bearer " + t)),
        "document": documents,
        "mutation": st.sampled_from(
            ["none"] * 6 + ["surrogate", "digits", "deep", "deep_open", "truncate", "garble", "nul"]
        ),
        "where": st.floats(0, 1),
        "content_type": st.sampled_from(CONTENT_TYPES),
        "length": st.sampled_from(["right"] * 8 + ["short", "long", "huge"]),
        "rid": st.one_of(
            st.text(alphabet="abcdef0123456789", min_size=32, max_size=32), st.sampled_from(["x", "%00", "a" * 300])
        ),
    }
)


def body_of(case: dict) -> bytes:
    raw = json.dumps(case["document"], allow_nan=True).encode()
    return _mutate(raw, case["mutation"], case["where"])


# --- sending and checking --------------------------------------------------------------------------


def path_of(case: dict, thread_id: str) -> str:
    route = {"POST": case["route"], "GET": case["get_route"], "ADMIN": case["admin_route"]}[case["method"]]
    path = route.format(thread=thread_id, rid=quote(case["rid"], safe=""))
    return path + ("?" + case["query"] if case["query"] is not None else "")


def run_case(host: str, port: int, thread_id: str, case: dict) -> tuple[str, str | None]:
    """(what came back: a status or "closed", a problem or None)."""
    is_get = case["method"] == "GET"
    body = b"" if is_get else body_of(case)
    headers = {"host": f"{host}:{port}"}
    if case["content_type"] is not None and not is_get:
        headers["content-type"] = case["content_type"]
    if case["authorization"] is not None:
        headers["authorization"] = case["authorization"]
    length = "right" if is_get else case["length"]
    declared = {"right": len(body), "short": max(0, len(body) - 3), "long": len(body) + 5, "huge": 10**12}[length]
    method = "GET" if is_get else "POST"
    head = (
        f"{method} {path_of(case, thread_id)} HTTP/1.1\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        + f"content-length: {declared}\r\nconnection: close\r\n\r\n".encode()
    )
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=DEADLINE_S) as sock:
        try:
            sock.sendall(head + body)
            if length in ("long", "huge"):
                sock.shutdown(socket.SHUT_WR)  # a client that promised more and left
        except OSError:
            pass  # the server refused early (413) and closed: read what it said
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if time.monotonic() - started > DEADLINE_S:
                    return "hang", f"no end within {DEADLINE_S} s"
        except TimeoutError:
            return "hang", f"no answer within {DEADLINE_S} s"
        except ConnectionResetError:
            pass
    if not data:
        return "closed", None
    status = data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"HTTP/1.1 ") else "garbage"
    if status == "garbage":
        return status, f"not an HTTP response: {data[:80]!r}"
    if status.startswith("5"):
        return status, data.partition(b"\r\n\r\n")[2][:300].decode(errors="replace")
    if status == "200" and b"text/event-stream" in data.split(b"\r\n\r\n", 1)[0]:
        return status, _stream_problem(data)
    return status, None


def _stream_problem(data: bytes) -> str | None:
    text = data.decode(errors="replace")
    if "internal_error" in text:
        return "an internal_error event"
    ends = ('"type":"done"', '"type": "done"', '"type":"error"', '"type": "error"', "data: [DONE]", 'data: {"error"')
    return None if any(e in text for e in ends) else "the stream ended without a terminal event"


def new_thread(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=DEADLINE_S) as sock:
        sock.sendall(
            f"POST /api/threads HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])["thread_id"]


def fuzz(host: str, port: int, count: int, max_s: float, seed: int | None = None) -> tuple[Counter, list]:
    """Run up to `count` generated cases within `max_s`; (status counts, failures)."""
    from hypothesis import HealthCheck, Phase, given, settings

    thread_id = new_thread(host, port)
    statuses, failures = Counter(), []
    stop_at = time.monotonic() + max_s

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=seed is not None,
    )
    @given(cases)
    def one(case):
        if time.monotonic() > stop_at:
            return
        status, problem = run_case(host, port, thread_id, case)
        statuses[status] += 1
        if problem is not None:
            failures.append((status, problem, path_of(case, thread_id)[:120], body_of(case)[:200]))

    one()
    return statuses, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--max-s", type=float, default=900.0, help="stop generating after this many seconds")
    parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args(argv)
    from tests.support import chat_body, request, running_gateway, running_sim, stream_chat

    started = time.monotonic()
    import secrets

    # an admin token nobody knows: the admin routes answer, and every fuzzed token is wrong
    env = {"SLUICE_ADMIN_TOKEN": secrets.token_hex(16)}
    with running_sim() as sim, running_gateway({**env, "SIMULATED_BASE_URL": sim}) as gw:
        statuses, failures = fuzz("127.0.0.1", gw.port, args.cases, args.max_s)
        ready = request("GET", gw.url + "/readyz")[0]
        chat = stream_chat(gw.url + "/api/chat", chat_body("after the fuzz\n#sim tokens=2"))
        healthy = ready == 200 and chat[0] == 200 and chat[2][-1][1].get("type") == "done"
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    summary = (
        f"{total} cases in {elapsed:.0f} s: "
        + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
        + f"; failures: {len(failures)}; healthy after: {'yes' if healthy else 'NO'}"
    )
    print(summary)
    for failure in failures[:10]:
        print("  FAIL", failure)
    if args.record:
        line = f"\n- `python -m bench.fuzz_bodies` ({time.strftime('%Y-%m-%d')}): {summary}\n"
        with open(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "a") as out:
            out.write(line)
    return 0 if not failures and healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
