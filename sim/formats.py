"""Wire formats spoken by the simulated provider: pure functions, no I/O.

This module owns what the simulated upstream *says*: which text a request
gets back (deterministic tokens), how the ``#sim`` directive in a prompt is
read, and how a reply is framed on the wire for each provider API.  The
server in ``sim/provider.py`` owns *when* and *how* the bytes are sent
(pacing, failures, HTTP/2 vs HTTP/1.1).

A provider API is one ``WireFormat``: a handful of pure functions that turn a
parsed request body plus a token list into byte chunks.  Streams come back
as ``Frames(head, tokens, tail)`` so the server can pace the token chunks,
stop after N of them (``reset_mid``/``stall``/``truncate``/``error_mid``) and
leave out the tail.

Formats spoken (``ROUTES``), each with its own HTTP error body and in-band
error frame (``fail=error_mid``), and modelled on the transcripts in
tests/fixtures/providers so sluice's adapters parse them like the real thing:

    POST /v1/chat/completions  OpenAI chat (also sluice's "simulated" provider)
    POST /v1/responses         OpenAI Responses (typed SSE events)
    POST /v1/messages          Anthropic Messages (named SSE events, ping, no [DONE])
    POST /v1/agent             Perplexity Agent API (Responses-style + reasoning/search events)
    POST /chat/completions     Perplexity Sonar (full stream mode: accumulated message,
                               citations, search_results; ends without [DONE])
    POST /api/chat             Ollama (NDJSON, done:true last; stream defaults to on)
    POST /v1/embeddings        OpenAI embeddings (never streamed; a small vector per input,
                               from a hash of that input: see ``embedding``)

Every format derives its answer from the same normalized conversation
(``[{"role", "content": text}]``, system text first), so one prompt gets the
same tokens whichever API it is sent through.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Knobs and their defaults.  The server merges: DEFAULT_KNOBS <- /config <- #sim.
DEFAULT_KNOBS: dict[str, Any] = {
    "ttft_ms": 50,  # delay before the first byte of the response body
    "headers_ms": 0,  # delay before the response headers of a 200 (a provider still queueing the call)
    "token_interval_ms": 10,  # delay between token chunks
    "tokens": 12,  # number of tokens in a full answer
    "fail": "none",  # none | 429 | 500 | 503 | reset_first | reset_mid | stall | stall_first | truncate | error_mid | malformed | cut_utf8 | no_done | json_200 | html_200 | huge_frame | goaway_mid | keepalive_only | pings_only
    "fail_after_tokens": 3,  # tokens sent before reset_mid / stall / error_mid take effect
    "retry_after_s": 1,  # Retry-After header value with fail=429 ("none": no header)
    "fail_times": 0,  # fail only the first N calls with this exact body, then answer (0: always)
    "idle_close_s": 0,  # /config only: GOAWAY + close an HTTP/2 connection idle this long (0: never)
    "fail_keys": "",  # "k1,k2": `fail` applies only to calls made with these API keys ("": every call)
    "reply": "text",  # text | tool_call (OpenAI chat: call the first tool when the last turn is the user's)
}
# reset_first: the stream is reset (HTTP/2 RST_STREAM, HTTP/1.1 the socket closed) before
# any response byte, as a server closing the connection under a request would.
# error_mid: the format's own in-band error frame after fail_after_tokens tokens, then a
# clean end of the response (non-streamed calls get the HTTP 500 error instead).
# stall_first: no response at all (no status, no byte) until the client gives up.
# malformed: after fail_after_tokens tokens, a line that is no SSE field and a frame that
# is not JSON (NDJSON: a line that is not JSON), then a clean end of the response.
# cut_utf8: after fail_after_tokens tokens, the next frame (a token with a two-byte
# character) cut inside that character, then a clean end: the body stops mid-UTF-8.
# (Non-streamed calls: malformed and cut_utf8 behave like truncate.)
# no_done: every token, then a clean end without the format's tail (no finish, no [DONE],
# no message_stop): a stream that stops as if complete (non-streamed: like truncate).
# json_200: status 200 with the API's JSON error body (application/json), streamed or not:
# a proxy or provider that reports a failure with the wrong status.
# html_200: status 200, content-type text/html, an HTML page (a CDN or captive portal).
# huge_frame: after fail_after_tokens tokens, one token of HUGE_TOKEN_BYTES (one SSE line of
# several MB), then the rest of the answer as usual.
# goaway_mid: after fail_after_tokens tokens, GOAWAY(INTERNAL_ERROR) and the connection
# closed (HTTP/1.1: the socket closed): every other call on the connection is cut too.
# keepalive_only: after fail_after_tokens tokens, only keepalives (an SSE comment; NDJSON:
# an empty line) every token_interval_ms, forever: bytes that never carry an answer.
# pings_only: the same with the format's own ping, a frame with data (Anthropic's
# `event: ping`; formats without one send keepalive_only's bytes): a provider stuck in a
# "thinking" phase for ever, which only UPSTREAM_MAX_DURATION_S ends.
# OpenAI chat also answers as a real provider would: JSON when response_format asks for it
# (json_object: {"answer": <the tokens>}; json_schema: an example of the schema), logprobs
# when logprobs is true (top_logprobs alternatives each), n choices for n > 1, and with
# reply=tool_call a call of the first tool (arguments: an example of its parameters, streamed
# in as many fragments as there are tokens) unless the conversation already ends in a tool
# result; a `tool_choice` that forces a tool ("required", or a named function) calls that
# tool without the directive, as a real model must. Anthropic Messages calls a tool the same
# way (a tool_use block, its input as input_json_delta fragments, stop_reason tool_use).
FAIL_MODES = (
    "none",
    "429",
    "500",
    "503",
    "reset_first",
    "reset_mid",
    "stall",
    "stall_first",
    "truncate",
    "error_mid",
    "malformed",
    "cut_utf8",
    "no_done",
    "json_200",
    "html_200",
    "huge_frame",
    "goaway_mid",
    "keepalive_only",
    "pings_only",
)
HUGE_TOKEN_BYTES = 3 * 1024 * 1024
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"

# Small fixed vocabulary: answers are readable and tokens are easy to assert on.
WORDS = (
    "the",
    "quick",
    "river",
    "carries",
    "light",
    "across",
    "a",
    "quiet",
    "valley",
    "where",
    "stone",
    "bridges",
    "hold",
    "old",
    "songs",
    "of",
    "rain",
    "and",
    "wind",
    "that",
    "gather",
    "slowly",
    "under",
    "bright",
    "northern",
    "skies",
    "while",
    "lanterns",
    "drift",
    "toward",
    "distant",
    "shores",
)


class KnobError(ValueError):
    """A knob name or value the simulator does not understand (-> HTTP 400)."""


def _coerce(value: Any) -> Any:
    """Directive values are text: numbers become int/float, the rest stays str."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def validate_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """Check names and types of a (partial) knob dict; return a normalised copy."""
    if not isinstance(knobs, dict):
        raise KnobError("config must be a JSON object")
    out: dict[str, Any] = {}
    for key, raw in knobs.items():
        if key not in DEFAULT_KNOBS:
            raise KnobError(f"unknown sim knob {key!r}; known: {', '.join(DEFAULT_KNOBS)}")
        value = _coerce(raw)
        if key == "fail":
            # "fail=500" arrives as the number 500; modes are compared as text.
            value = str(int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
            if value not in FAIL_MODES:
                raise KnobError(f"fail must be one of {', '.join(FAIL_MODES)}, not {value!r}")
        elif key == "retry_after_s" and value == "none":
            value = None
        elif key == "reply":
            value = str(value)
            if value not in ("text", "tool_call"):
                raise KnobError(f"reply must be text or tool_call, not {raw!r}")
        elif key == "fail_keys":
            if not isinstance(raw, str):
                raise KnobError(f"fail_keys must be text (API keys separated by commas), not {raw!r}")
            value = raw
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise KnobError(f"{key} must be a non-negative number, not {raw!r}")
            if key in ("tokens", "fail_after_tokens", "fail_times"):
                if value != int(value):
                    raise KnobError(f"{key} must be a whole number, not {raw!r}")
                value = int(value)
        out[key] = value
    return out


_DIRECTIVE = re.compile(r"#sim\b([^\r\n]*)")


def parse_directive(text: str) -> dict[str, Any]:
    """Read ``#sim key=value key=value`` (to end of line) out of prompt text.

    Several ``#sim`` lines may appear; later ones win.  Returns validated knobs.
    """
    found: dict[str, Any] = {}
    for match in _DIRECTIVE.finditer(text or ""):
        for item in match.group(1).split():
            key, sep, value = item.partition("=")
            if not sep:
                raise KnobError(f"#sim expects key=value, got {item!r}")
            found[key] = value
    return validate_knobs(found)


def make_tokens(conversation: Any, count: int) -> list[str]:
    """Deterministic answer: the same conversation always gets the same words.

    sha256 (not ``hash()``) so the answer is stable across processes and runs;
    token i depends only on (conversation, i), so a shorter answer is a prefix
    of a longer one.
    """
    seed = hashlib.sha256(json.dumps(conversation, sort_keys=True, ensure_ascii=False).encode()).digest()
    tokens = []
    for i in range(count):
        digest = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        tokens.append(WORDS[int.from_bytes(digest[:4], "big") % len(WORDS)] + " ")
    return tokens


@dataclass(frozen=True)
class Frames:
    """A streamed reply: ``head`` before the first token, one chunk per token, ``tail``."""

    head: list[bytes]
    tokens: list[bytes]
    tail: list[bytes]


@dataclass(frozen=True)
class Meta:
    """Per-call identity the formats stamp into replies (ids, timestamps)."""

    call_id: int
    created: int  # unix seconds


@dataclass(frozen=True)
class WireFormat:
    """One provider API.  All functions are pure.

    prompt(body) -> text of the last user message (where ``#sim`` is read)
    conversation(body) -> JSON-able value the answer is derived from
    wants_stream(body) -> bool
    stream(body, tokens, meta) -> Frames
    complete(body, tokens, meta) -> bytes   (non-streamed JSON body)
    error(status, message) -> bytes         (the API's error JSON)
    midstream_error(body, tokens, meta, sent) -> bytes
                                            (in-band error frame after ``sent`` tokens)
    """

    name: str
    stream_content_type: str
    prompt: Callable[[dict], str]
    conversation: Callable[[dict], Any]
    wants_stream: Callable[[dict], bool]
    stream: Callable[[dict, list[str], Meta], Frames]
    complete: Callable[[dict, list[str], Meta], bytes]
    error: Callable[[int, str], bytes]
    midstream_error: Callable[[dict, list[str], Meta, int], bytes]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _content_text(content: Any) -> str:
    """OpenAI-style content: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _messages(body: dict) -> list:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


# ---------------------------------------------------------------- OpenAI chat


def _openai_prompt(body: dict) -> str:
    for message in reversed(_messages(body)):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _openai_usage(body: dict, tokens: list[str]) -> dict:
    # A rough word count stands in for the tokenizer; clients only need plausible numbers.
    prompt = sum(len(_content_text(m.get("content")).split()) + 3 for m in _messages(body) if isinstance(m, dict))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(tokens),
        "total_tokens": prompt + len(tokens),
    }


def _openai_base(body: dict, meta: Meta, obj: str) -> dict:
    return {
        "id": f"chatcmpl-sim{meta.call_id:08d}",
        "object": obj,
        "created": meta.created,
        "model": body.get("model") or "sim-1",
        "system_fingerprint": "fp_sim",
    }


def example_of(schema: Any) -> Any:
    """A value that fits a JSON schema (the common subset: type, properties, items, enum)."""
    if not isinstance(schema, dict):
        return "sim"
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        return {name: example_of(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example_of(schema.get("items"))]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "sim")


def _split(text: str, n: int) -> list[str]:
    """`text` in `n` pieces (n >= 1), in order."""
    size = -(-len(text) // n) if text else 0
    return [text[i * size : (i + 1) * size] for i in range(n)] if size else [text] + [""] * (n - 1)


def _logprobs(text: str, top: int) -> dict:
    entry = {"token": text, "logprob": -0.25, "bytes": list(text.encode())}
    alternatives = [dict(entry, logprob=-0.25 - i) for i in range(top)]
    return {"content": [dict(entry, top_logprobs=alternatives)], "refusal": None}


def _forced_tool(choice: Any, tools: list[dict]) -> dict | None:
    """The tool a `tool_choice` forces (a named function, or "required": the first), else None."""
    if choice == "required" and tools:
        return tools[0]
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None  # any other shape forces nothing
    return next((t for t in tools if t.get("name") == name), None) if name else None


def _openai_choices(body: dict, tokens: list[str], meta: Meta) -> list[tuple[list[dict], list[dict | None], str]]:
    """Per choice: one delta per token, their logprobs (or None), and the finish reason."""
    try:
        reply = parse_directive(_openai_prompt(body)).get("reply", "text")
    except KnobError:
        reply = "text"
    n = body.get("n") if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else 1
    messages = _messages(body)
    tools = [
        t.get("function")
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    fmt = body.get("response_format") if isinstance(body.get("response_format"), dict) else {}
    wants_logprobs = body.get("logprobs") is True
    top = body.get("top_logprobs") if isinstance(body.get("top_logprobs"), int) else 0
    out = []
    for k in range(max(1, min(n, 16))):
        toks = tokens if k == 0 else make_tokens([messages, k], len(tokens))
        count = max(len(toks), 1)
        last_role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
        forced = _forced_tool(body.get("tool_choice"), tools)
        if (reply == "tool_call" or forced) and tools and last_role == "user":
            chosen = forced or tools[0]
            call = {
                "index": 0,
                "id": f"call_sim{meta.call_id:06d}_{k}",
                "type": "function",
                "function": {"name": chosen.get("name"), "arguments": ""},
            }
            args = _split(json.dumps(example_of(chosen.get("parameters"))), count)
            deltas = [{"tool_calls": [dict(call, function=dict(call["function"], arguments=args[0]))]}]
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in args[1:]]
            out.append((deltas, [None] * count, "tool_calls"))
            continue
        if fmt.get("type") == "json_object":
            pieces = _split(json.dumps({"answer": "".join(toks).strip()}), count)
        elif fmt.get("type") == "json_schema":
            pieces = _split(json.dumps(example_of((fmt.get("json_schema") or {}).get("schema"))), count)
        else:
            pieces = toks or [""]
        logprobs = [_logprobs(p, top) if wants_logprobs else None for p in pieces]
        out.append(([{"content": p} for p in pieces], logprobs, "stop"))
    return out


def _openai_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> bytes:
        obj = _openai_base(body, meta, "chat.completion.chunk")
        obj["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if include_usage:
            obj["usage"] = None  # the real API sends usage:null on every chunk but the last
        return _sse(obj)

    choices = _openai_choices(body, tokens, meta)
    steps = [
        b"".join(chunk(k, d[i], None, lp[i]) for k, (d, lp, _) in enumerate(choices)) for i in range(len(choices[0][0]))
    ]
    tail = [chunk(k, {}, finish) for k, (_, _, finish) in enumerate(choices)]
    if not tokens:  # no token steps to pace: the reply goes out with the tail
        tail = steps + tail
    if include_usage:
        last = _openai_base(body, meta, "chat.completion.chunk")
        last["choices"] = []
        last["usage"] = _openai_usage(body, tokens)
        tail.append(_sse(last))
    tail.append(b"data: [DONE]\n\n")
    return Frames(
        head=[chunk(k, {"role": "assistant", "content": ""}, None) for k in range(len(choices))],
        tokens=steps if tokens else [],
        tail=tail,
    )


def _openai_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    obj = _openai_base(body, meta, "chat.completion")
    obj["choices"] = []
    for k, (deltas, logprobs, finish) in enumerate(_openai_choices(body, tokens, meta)):
        text = "".join(d.get("content", "") for d in deltas)
        message: dict = {"role": "assistant", "content": None if finish == "tool_calls" else text, "refusal": None}
        if finish == "tool_calls":
            call = deltas[0]["tool_calls"][0]
            args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
            message["tool_calls"] = [
                {k2: v for k2, v in call.items() if k2 != "index"}
                | {"function": {"name": call["function"]["name"], "arguments": args}}
            ]
        content_lp = [entry for lp in logprobs if lp for entry in lp["content"]]
        obj["choices"].append(
            {
                "index": k,
                "message": message,
                "logprobs": {"content": content_lp, "refusal": None} if content_lp else None,
                "finish_reason": finish,
            }
        )
    obj["usage"] = _openai_usage(body, tokens)
    return _dumps(obj)


_OPENAI_ERROR_KINDS = {
    429: ("rate_limit_error", "rate_limit_exceeded"),
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
}


def openai_error(status: int, message: str) -> bytes:
    """OpenAI error JSON; also the simulator's generic error shape (404, bad /config)."""
    kind, code = _OPENAI_ERROR_KINDS.get(status, ("server_error", None))
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


MIDSTREAM_MESSAGE = "The server had an error while processing your request (simulated)."


def _openai_midstream_error(body: dict, tokens: list[str], meta: Meta, sent: int) -> bytes:
    # What the OpenAI SDK reads as an in-band failure: a data line with an "error" object.
    return _sse({"error": {"message": MIDSTREAM_MESSAGE, "type": "server_error", "param": None, "code": None}})


openai_chat = WireFormat(
    name="openai_chat",
    stream_content_type="text/event-stream",
    prompt=_openai_prompt,
    conversation=_messages,
    wants_stream=lambda body: body.get("stream") is True,
    stream=_openai_stream,
    complete=_openai_complete,
    error=openai_error,
    midstream_error=_openai_midstream_error,
)


# ---------------------------------------------------------------- shared by the other formats


def _event(name: str, obj: Any) -> bytes:
    """A named SSE event (Anthropic, OpenAI Responses, Perplexity Agent)."""
    return b"event: " + name.encode() + b"\n" + _sse(obj)


def _turns(messages: Any, system: Any = None) -> list[dict]:
    """The normalized conversation every format answers from: system text first, then
    ``{"role", "content": text}`` per message (so a prompt gets the same tokens in every API)."""
    system_text = _content_text(system)
    out = [{"role": "system", "content": system_text}] if system_text else []
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and isinstance(message.get("role"), str):
            out.append({"role": message["role"], "content": _content_text(message.get("content"))})
    return out


def _last_user(turns: list[dict]) -> str:
    for turn in reversed(turns):
        if turn["role"] == "user":
            return turn["content"]
    return ""


def _prompt_tokens(turns: list[dict]) -> int:
    # The same rough word count as _openai_usage: plausible numbers, no tokenizer.
    return sum(len(turn["content"].split()) + 3 for turn in turns)


def _search_query(prompt: str) -> str:
    return _DIRECTIVE.sub("", prompt).strip()[:80] or "simulated search"


def _search_results() -> list[dict]:
    """Fixed, clearly fake sources for the search-grounded formats (Perplexity)."""
    return [
        {
            "id": i,
            "title": f"Simulated source {i}",
            "url": f"https://example.com/sim/{i}",
            "snippet": f"Simulated search result number {i}.",
            "date": "2025-01-01",
            "last_updated": "2025-01-01",
            "source": "web",
        }
        for i in (1, 2)
    ]


def _typed(events: list[dict], start: int) -> list[bytes]:
    """Responses-style frames: ``event: <type>`` plus JSON repeating the type, with
    sequence_number counted from ``start``."""
    return [
        _event(
            e["type"], {"type": e["type"], "sequence_number": start + i, **{k: v for k, v in e.items() if k != "type"}}
        )
        for i, e in enumerate(events)
    ]


# ---------------------------------------------------------------- Anthropic Messages
# Shapes: tests/fixtures/providers/anthropic*.sse and http_errors.json["anthropic"].


def _anthropic_turns(body: dict) -> list[dict]:
    return _turns(_messages(body), body.get("system"))


def _anthropic_message(body: dict, meta: Meta, content: list, stop_reason: str | None, usage: dict) -> dict:
    return {
        "id": f"msg_sim{meta.call_id:08d}",
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": body.get("model") or "sim-1",
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _anthropic_tool_call(body: dict, tokens: list[str], meta: Meta) -> tuple[dict, list[str]] | None:
    """(the tool_use block, its input's JSON text in one piece per token) when this call
    answers with a tool: as OpenAI chat does (reply=tool_call, or a forcing tool_choice),
    unless the conversation already ends in a tool result."""
    try:
        reply = parse_directive(_last_user(_anthropic_turns(body))).get("reply", "text")
    except KnobError:
        reply = "text"
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("name"), str)]
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
    forced = tools[0] if choice.get("type") == "any" and tools else None
    if choice.get("type") == "tool":
        forced = next((t for t in tools if t["name"] == choice.get("name")), None)
    messages = _messages(body)
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    content = last.get("content")
    answered = isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )
    if not tools or answered or not (reply == "tool_call" or forced):
        return None
    chosen = forced or tools[0]
    block = {"type": "tool_use", "id": f"toolu_sim{meta.call_id:06d}", "name": chosen["name"], "input": {}}
    return block, _split(json.dumps(example_of(chosen.get("input_schema"))), max(len(tokens), 1))


def _anthropic_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    usage = {
        "input_tokens": _prompt_tokens(_anthropic_turns(body)),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    head = [
        _event("message_start", {"type": "message_start", "message": _anthropic_message(body, meta, [], None, usage)}),
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        _event("ping", {"type": "ping"}),
    ]
    deltas = [
        _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in tokens
    ]
    stop_reason = "end_turn"
    tool = _anthropic_tool_call(body, tokens, meta)
    if tool is not None:  # a tool_use block instead of the text one, its input in fragments
        block, pieces = tool
        head[1] = _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        deltas = [
            _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}},
            )
            for p in pieces
        ]
        stop_reason = "tool_use"
    tail = [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(tokens)},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    if not tokens:  # nothing to pace: the fragments go out with the tail
        tail, deltas = deltas + tail, []
    return Frames(head, deltas, tail)


def _anthropic_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    usage = {"input_tokens": _prompt_tokens(_anthropic_turns(body)), "output_tokens": len(tokens)}
    tool = _anthropic_tool_call(body, tokens, meta)
    if tool is not None:
        block, pieces = tool
        content = [{**block, "input": json.loads("".join(pieces))}]
        return _dumps(_anthropic_message(body, meta, content, "tool_use", usage))
    content = [{"type": "text", "text": "".join(tokens)}]
    return _dumps(_anthropic_message(body, meta, content, "end_turn", usage))


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return _dumps({"type": "error", "error": {"type": kind, "message": message}})


def _anthropic_midstream_error(body: dict, tokens: list[str], meta: Meta, sent: int) -> bytes:
    # Anthropic's typical mid-stream failure (see anthropic_overloaded.sse).
    return _event(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded (simulated)"}}
    )


anthropic_messages = WireFormat(
    name="anthropic",
    stream_content_type="text/event-stream",
    prompt=lambda body: _last_user(_anthropic_turns(body)),
    conversation=_anthropic_turns,
    wants_stream=lambda body: body.get("stream") is True,
    stream=_anthropic_stream,
    complete=_anthropic_complete,
    error=anthropic_error,
    midstream_error=_anthropic_midstream_error,
)


# ---------------------------------------------------------------- Responses-style APIs
# OpenAI Responses (openai_responses*.sse) and Perplexity's Agent API (perplexity_agent*.sse)
# share the event sequence; they differ in the response object, extra reasoning/search
# events, content_part events (OpenAI only) and where response.failed puts the error.


def _responses_turns(body: dict) -> list[dict]:
    raw = body.get("input")
    if isinstance(raw, str):
        items = [{"role": "user", "content": raw}]
    elif isinstance(raw, list):  # message items; function_call_output etc. carry no prompt
        items = [i for i in raw if isinstance(i, dict) and i.get("type", "message") == "message"]
    else:
        items = []
    return _turns(items, body.get("instructions"))


def _responses_usage(body: dict, tokens: list[str]) -> dict:
    prompt = _prompt_tokens(_responses_turns(body))
    return {"input_tokens": prompt, "output_tokens": len(tokens), "total_tokens": prompt + len(tokens)}


def _openai_response(
    body: dict, meta: Meta, status: str, output: list, usage: dict | None, error: dict | None = None
) -> dict:
    return {
        "id": f"resp_sim{meta.call_id:08d}",
        "object": "response",
        "created_at": meta.created,
        "status": status,
        "error": error,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model") or "sim-1",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _perplexity_response(
    body: dict, meta: Meta, status: str, output: list, usage: dict | None, error: dict | None = None
) -> dict:
    obj = {
        "id": f"resp_sim{meta.call_id:08d}",
        "object": "response",
        "created_at": meta.created,
        "status": status,
        "model": body.get("model") or body.get("preset") or "sim-1",
        "output": output,
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


def _responses_frames(
    body: dict,
    tokens: list[str],
    meta: Meta,
    response: Callable,
    before: list[dict],
    output_before: list[dict],
    parts: bool,
) -> Frames:
    text = "".join(tokens)
    item_id = f"msg_sim{meta.call_id:08d}"
    index = len(output_before)
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    where = {"item_id": item_id, "output_index": index, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_part = {**part, "text": text}
    done_item = {**item, "status": "completed", "content": [done_part]}
    head = [
        {"type": "response.created", "response": response(body, meta, "in_progress", [], None)},
        {"type": "response.in_progress", "response": response(body, meta, "in_progress", [], None)},
        *before,
        {"type": "response.output_item.added", "output_index": index, "item": item},
    ]
    tail = [{"type": "response.output_text.done", **where, "text": text}]
    if parts:
        head.append({"type": "response.content_part.added", **where, "part": part})
        tail.append({"type": "response.content_part.done", **where, "part": done_part})
    tail += [
        {"type": "response.output_item.done", "output_index": index, "item": done_item},
        {
            "type": "response.completed",
            "response": response(body, meta, "completed", [*output_before, done_item], _responses_usage(body, tokens)),
        },
    ]
    deltas = [{"type": "response.output_text.delta", **where, "delta": t} for t in tokens]
    return Frames(
        _typed(head, 0),
        [_typed([d], len(head) + i)[0] for i, d in enumerate(deltas)],
        _typed(tail, len(head) + len(tokens)),
    )


def _openai_responses_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    return _responses_frames(body, tokens, meta, _openai_response, [], [], parts=True)


def _openai_responses_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    item = {
        "id": f"msg_sim{meta.call_id:08d}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "".join(tokens), "annotations": []}],
    }
    return _dumps(_openai_response(body, meta, "completed", [item], _responses_usage(body, tokens)))


def _openai_responses_midstream_error(body: dict, tokens: list[str], meta: Meta, sent: int) -> bytes:
    seq = len(_openai_responses_stream(body, tokens, meta).head) + sent
    error = {"code": "server_error", "message": MIDSTREAM_MESSAGE}
    return _typed(
        [{"type": "response.failed", "response": _openai_response(body, meta, "failed", [], None, error)}], seq
    )[0]


openai_responses = WireFormat(
    name="openai_responses",
    stream_content_type="text/event-stream",
    prompt=lambda body: _last_user(_responses_turns(body)),
    conversation=_responses_turns,
    wants_stream=lambda body: body.get("stream") is True,
    stream=_openai_responses_stream,
    complete=_openai_responses_complete,
    error=openai_error,
    midstream_error=_openai_responses_midstream_error,
)


def _agent_search(body: dict) -> tuple[list[dict], list[dict]]:
    """(reasoning/search events before the answer, the search_results output item)."""
    query = _search_query(_last_user(_responses_turns(body)))
    results = _search_results()
    found = {"type": "search_results", "queries": [query], "results": results}
    before = [
        {"type": "response.reasoning.started", "thought": "I should look this up (simulated)."},
        {"type": "response.reasoning.search_queries", "queries": [query], "thought": "Searching the web."},
        {"type": "response.reasoning.search_results", "results": results},
        {"type": "response.reasoning.stopped", "thought": "Found sources."},
        {"type": "response.output_item.added", "output_index": 0, "item": {**found, "results": []}},
        {"type": "response.output_item.done", "output_index": 0, "item": found},
    ]
    return before, [found]


def _agent_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    before, output_before = _agent_search(body)
    return _responses_frames(body, tokens, meta, _perplexity_response, before, output_before, parts=False)


def _agent_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    _, output_before = _agent_search(body)
    item = {
        "id": f"msg_sim{meta.call_id:08d}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "".join(tokens), "annotations": []}],
    }
    return _dumps(_perplexity_response(body, meta, "completed", [*output_before, item], _responses_usage(body, tokens)))


def _agent_midstream_error(body: dict, tokens: list[str], meta: Meta, sent: int) -> bytes:
    # Perplexity puts the error at the top level of response.failed (perplexity_agent_failed.sse).
    seq = len(_agent_stream(body, tokens, meta).head) + sent
    error = {"code": "server_error", "message": MIDSTREAM_MESSAGE, "type": "server_error"}
    return _typed([{"type": "response.failed", "error": error}], seq)[0]


_PERPLEXITY_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "unauthorized",
    404: "not_found",
    405: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def perplexity_error(status: int, message: str) -> bytes:
    """Perplexity's error JSON (http_errors.json["perplexity"]): the HTTP status as "code"."""
    kind = _PERPLEXITY_ERROR_TYPES.get(status, "internal_server_error")
    return _dumps({"error": {"message": message, "type": kind, "code": status}})


perplexity_agent = WireFormat(
    name="perplexity_agent",
    stream_content_type="text/event-stream",
    prompt=lambda body: _last_user(_responses_turns(body)),
    conversation=_responses_turns,
    wants_stream=lambda body: body.get("stream") is True,
    stream=_agent_stream,
    complete=_agent_complete,
    error=perplexity_error,
    midstream_error=_agent_midstream_error,
)


# ---------------------------------------------------------------- Perplexity Sonar
# Full stream mode (perplexity_sonar_full.sse): every chunk repeats the text so far in
# choices[0].message.content next to the new delta, plus citations, search_results and
# running usage.  The stream ends after the finish chunk without [DONE], as Perplexity
# has been seen to do; sluice's adapter accepts both.


def _sonar_chunk(body: dict, meta: Meta, prompt: int, done: str, delta: str, count: int, finish: str | None) -> dict:
    results = _search_results()
    return {
        "id": f"sim-{meta.call_id:08d}",
        "model": body.get("model") or "sonar",
        "created": meta.created,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": count,
            "total_tokens": prompt + count,
            "search_context_size": "low",
        },
        "citations": [r["url"] for r in results],
        "search_results": [{k: r[k] for k in ("title", "url", "date", "last_updated", "snippet")} for r in results],
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": done},
                "delta": {"role": "assistant", "content": delta},
            }
        ],
    }


def _sonar_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    prompt = _prompt_tokens(_turns(_messages(body)))
    chunks = [
        _sse(_sonar_chunk(body, meta, prompt, "".join(tokens[: i + 1]), t, i + 1, None)) for i, t in enumerate(tokens)
    ]
    last = _sonar_chunk(body, meta, prompt, "".join(tokens), "", len(tokens), "stop")
    return Frames([], chunks, [_sse(last)])


def _sonar_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    prompt = _prompt_tokens(_turns(_messages(body)))
    obj = _sonar_chunk(body, meta, prompt, "".join(tokens), "", len(tokens), "stop")
    obj["object"] = "chat.completion"
    del obj["choices"][0]["delta"]
    return _dumps(obj)


def _sonar_midstream_error(body: dict, tokens: list[str], meta: Meta, sent: int) -> bytes:
    return _sse({"error": {"message": MIDSTREAM_MESSAGE, "type": "server_error", "code": 500}})


perplexity_sonar = WireFormat(
    name="perplexity_sonar",
    stream_content_type="text/event-stream",
    prompt=lambda body: _last_user(_turns(_messages(body))),
    conversation=lambda body: _turns(_messages(body)),
    wants_stream=lambda body: body.get("stream") is True,
    stream=_sonar_stream,
    complete=_sonar_complete,
    error=perplexity_error,
    midstream_error=_sonar_midstream_error,
)


# ---------------------------------------------------------------- Ollama
# NDJSON (ollama*.ndjson): one object per line, done:true with the counts last, a line
# {"error": "..."} for a failure mid-stream.  "stream" defaults to true in Ollama.


def _ollama_base(body: dict, meta: Meta) -> dict:
    stamp = datetime.fromtimestamp(meta.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"model": body.get("model") or "sim-1", "created_at": stamp}


def _ollama_done(body: dict, tokens: list[str], meta: Meta, content: str) -> dict:
    return {
        **_ollama_base(body, meta),
        "message": {"role": "assistant", "content": content},
        "done_reason": "stop",
        "done": True,
        "total_duration": 0,
        "load_duration": 0,
        "prompt_eval_count": _prompt_tokens(_turns(_messages(body))),
        "prompt_eval_duration": 0,
        "eval_count": len(tokens),
        "eval_duration": 0,
    }


def _ollama_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    base = _ollama_base(body, meta)
    lines = [_dumps({**base, "message": {"role": "assistant", "content": t}, "done": False}) + b"\n" for t in tokens]
    return Frames([], lines, [_dumps(_ollama_done(body, tokens, meta, "")) + b"\n"])


def ollama_error(status: int, message: str) -> bytes:
    return _dumps({"error": message})


ollama_chat = WireFormat(
    name="ollama",
    stream_content_type="application/x-ndjson",
    prompt=lambda body: _last_user(_turns(_messages(body))),
    conversation=lambda body: _turns(_messages(body)),
    wants_stream=lambda body: body.get("stream", True) is not False,
    stream=_ollama_stream,
    complete=lambda body, tokens, meta: _dumps(_ollama_done(body, tokens, meta, "".join(tokens))),
    error=ollama_error,
    midstream_error=lambda body, tokens, meta, sent: (
        _dumps({"error": "an error was encountered while running the model (simulated)"}) + b"\n"
    ),
)


# ---------------------------------------------------------------- broken bytes (fail modes)

CUT_TOKEN = "naïve "  # the token of cut_utf8: its "ï" is two bytes in UTF-8


def malformed_frame(fmt: WireFormat) -> bytes:
    """Bytes no parser of `fmt` can accept: garbage, and a frame that is not JSON."""
    if fmt.stream_content_type == "application/x-ndjson":
        return b'{"message": {"content": "unterminated\n'
    return b'this line is no SSE field\ndata: {"choices": [{"delta": {"content": "oops"\n\n'


def keepalive_frame(fmt: WireFormat) -> bytes:
    """Bytes every parser of `fmt` skips: an SSE comment, or an empty NDJSON line."""
    return b"\n" if fmt.stream_content_type == "application/x-ndjson" else b": keepalive\n\n"


def ping_frame(fmt: WireFormat) -> bytes:
    """The format's own ping, a frame its parser counts: Anthropic's `event: ping`; the
    others have none and get `keepalive_frame`'s bytes."""
    return _event("ping", {"type": "ping"}) if fmt.name == "anthropic" else keepalive_frame(fmt)


def cut_utf8_frame(fmt: WireFormat, body: dict, meta: Meta) -> bytes:
    """The frame of CUT_TOKEN, cut after the first byte of its two-byte character."""
    frame = fmt.stream(body, [CUT_TOKEN], meta).tokens[0]
    return frame[: frame.index("ï".encode()) + 1]


# ---------------------------------------------------------------- OpenAI embeddings

EMBEDDING_DIMENSIONS = 8  # without "dimensions" in the request; at most MAX_DIMENSIONS
MAX_DIMENSIONS = 256


def _embedding_inputs(body: dict) -> list:
    """The inputs as a list: a string, a list of strings, a token list or a list of those."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value)):
        return [value]
    return value if isinstance(value, list) else []


def embedding(item: Any, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic vector for one input: component i from sha256(input, i), in [-1, 1)
    and exact in float32 (so base64 and float answers agree)."""
    seed = hashlib.sha256(json.dumps(item, ensure_ascii=False).encode()).digest()
    out = []
    for i in range(dimensions):
        digest = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        out.append((int.from_bytes(digest[:2], "big") - 32768) / 32768)
    return out


def _embeddings_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    wanted = body.get("dimensions")
    dimensions = wanted if isinstance(wanted, int) and 0 < wanted <= MAX_DIMENSIONS else EMBEDDING_DIMENSIONS
    data = []
    for index, item in enumerate(_embedding_inputs(body)):
        vector: Any = embedding(item, dimensions)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    prompt = sum(len(item.split()) if isinstance(item, str) else len(item) for item in _embedding_inputs(body))
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    return _dumps({"object": "list", "data": data, "model": body.get("model") or "sim-embed-1", "usage": usage})


def _embeddings_prompt(body: dict) -> str:
    return "\n".join(item for item in _embedding_inputs(body) if isinstance(item, str))


openai_embeddings = WireFormat(
    name="openai_embeddings",
    stream_content_type="application/json",
    prompt=_embeddings_prompt,
    conversation=lambda body: _embedding_inputs(body),
    wants_stream=lambda body: False,
    stream=lambda body, tokens, meta: Frames([], [], [_embeddings_complete(body, tokens, meta)]),
    complete=_embeddings_complete,
    error=openai_error,
    midstream_error=lambda body, tokens, meta, sent: b"",
)


def _count_tokens_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    # The same rough count a Messages call reports as its input_tokens (no tokenizer).
    return _dumps({"input_tokens": _prompt_tokens(_anthropic_turns(body))})


# Anthropic's token counting (POST /v1/messages/count_tokens): one JSON answer, never a stream.
anthropic_count_tokens = WireFormat(
    name="anthropic_count_tokens",
    stream_content_type="application/json",
    prompt=lambda body: _last_user(_anthropic_turns(body)),
    conversation=_anthropic_turns,
    wants_stream=lambda body: False,
    stream=lambda body, tokens, meta: Frames([], [], [_count_tokens_complete(body, tokens, meta)]),
    complete=_count_tokens_complete,
    error=anthropic_error,
    midstream_error=lambda body, tokens, meta, sent: b"",
)


# Route path -> wire format.  Every path here counts as a completion call in /stats.
ROUTES: dict[str, WireFormat] = {
    "/v1/chat/completions": openai_chat,
    "/v1/responses": openai_responses,
    "/v1/messages": anthropic_messages,
    "/v1/agent": perplexity_agent,
    "/chat/completions": perplexity_sonar,
    "/api/chat": ollama_chat,
    "/v1/embeddings": openai_embeddings,
    "/v1/messages/count_tokens": anthropic_count_tokens,
}
