"""Wire formats spoken by the simulated provider: pure functions, no I/O.

This module owns what the simulated upstream *says*: which text a request
gets back (deterministic tokens), how the ``#sim`` directive in a prompt is
read, and how a reply is framed on the wire for each provider API.  The
server in ``sim/provider.py`` owns *when* and *how* the bytes are sent
(pacing, failures, HTTP/2 vs HTTP/1.1).

A provider API is one ``WireFormat``: a handful of pure functions that turn a
parsed request body plus a token list into byte chunks.  Streams come back
as ``Frames(head, tokens, tail)`` so the server can pace the token chunks,
stop after N of them (``reset_mid``/``stall``/``truncate``) and leave out the
tail.  To add a provider (Anthropic, Perplexity, Ollama, ...) write its
functions next to the OpenAI ones and add its path to ``ROUTES``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

# Knobs and their defaults.  The server merges: DEFAULT_KNOBS <- /config <- #sim.
DEFAULT_KNOBS: dict[str, Any] = {
    "ttft_ms": 50,            # delay before the first byte of the response body
    "token_interval_ms": 10,  # delay between token chunks
    "tokens": 12,             # number of tokens in a full answer
    "fail": "none",           # none | 429 | 500 | reset_mid | stall | truncate
    "fail_after_tokens": 3,   # tokens sent before reset_mid / stall take effect
    "retry_after_s": 1,       # Retry-After header value with fail=429
}
FAIL_MODES = ("none", "429", "500", "reset_mid", "stall", "truncate")

# Small fixed vocabulary: answers are readable and tokens are easy to assert on.
WORDS = (
    "the", "quick", "river", "carries", "light", "across", "a", "quiet", "valley",
    "where", "stone", "bridges", "hold", "old", "songs", "of", "rain", "and",
    "wind", "that", "gather", "slowly", "under", "bright", "northern", "skies",
    "while", "lanterns", "drift", "toward", "distant", "shores",
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
        else:
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise KnobError(f"{key} must be a non-negative number, not {raw!r}")
            if key in ("tokens", "fail_after_tokens"):
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
    seed = hashlib.sha256(
        json.dumps(conversation, sort_keys=True, ensure_ascii=False).encode()
    ).digest()
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
    """

    name: str
    stream_content_type: str
    prompt: Callable[[dict], str]
    conversation: Callable[[dict], Any]
    wants_stream: Callable[[dict], bool]
    stream: Callable[[dict, list[str], Meta], Frames]
    complete: Callable[[dict, list[str], Meta], bytes]
    error: Callable[[int, str], bytes]


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
    prompt = sum(
        len(_content_text(m.get("content")).split()) + 3
        for m in _messages(body) if isinstance(m, dict)
    )
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


def _openai_stream(body: dict, tokens: list[str], meta: Meta) -> Frames:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = _openai_base(body, meta, "chat.completion.chunk")
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if include_usage:
            obj["usage"] = None  # the real API sends usage:null on every chunk but the last
        return _sse(obj)

    tail = [chunk({}, "stop")]
    if include_usage:
        last = _openai_base(body, meta, "chat.completion.chunk")
        last["choices"] = []
        last["usage"] = _openai_usage(body, tokens)
        tail.append(_sse(last))
    tail.append(b"data: [DONE]\n\n")
    return Frames(
        head=[chunk({"role": "assistant", "content": ""}, None)],
        tokens=[chunk({"content": t}, None) for t in tokens],
        tail=tail,
    )


def _openai_complete(body: dict, tokens: list[str], meta: Meta) -> bytes:
    obj = _openai_base(body, meta, "chat.completion")
    obj["choices"] = [{
        "index": 0,
        "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }]
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


openai_chat = WireFormat(
    name="openai_chat",
    stream_content_type="text/event-stream",
    prompt=_openai_prompt,
    conversation=_messages,
    wants_stream=lambda body: body.get("stream") is True,
    stream=_openai_stream,
    complete=_openai_complete,
    error=openai_error,
)

# Route path -> wire format.  Every path here counts as a completion call in /stats.
ROUTES: dict[str, WireFormat] = {
    "/v1/chat/completions": openai_chat,
}
