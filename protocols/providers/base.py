"""What every provider adapter shares: the Parser skeleton, request and error helpers.

Each adapter module (openai_chat, openai_responses, anthropic, perplexity_agent,
perplexity_sonar, ollama) exposes the same small, sans-I/O interface:

    DEFAULT_BASE_URL, PATH
    Parser()                  .feed(chunk: bytes) -> list[event]   .close() -> list[event]
    build_request(*, base_url, api_key, model, body) -> (method, url, headers, body_bytes)
    error_from_response(status, headers, body) -> error event

Events are the normalized ones of protocols/events.py. The contract of every Parser:

- Chunk boundaries do not matter: the same bytes split anywhere give the same events.
- delta and meta events leave as soon as their frame is complete.
- usage (at most one, merged from everything the provider reported) and finish (exactly
  one; duplicates merged, the first reason wins) are held back until the provider's
  terminator, then emitted in the order: meta(tool_calls) if any, usage, finish. A
  terminator with no reason seen gives finish("stop").
- An error is emitted at most once and is always the last event: the provider's in-band
  error, error("upstream_malformed", ...) for a frame that is not valid JSON or has the
  wrong shape, or error("upstream_truncated", ...) from close() when the stream ended
  before its terminator. After a finish or an error, further input is ignored.
- So once close() has been called, a stream has produced exactly one finish or exactly
  one error, and it is the last event. feed() and close() never raise.

In-band provider errors are mapped onto the same codes as HTTP errors where the provider
says what kind they are (rate limit -> upstream_429, auth -> upstream_auth, overloaded /
server -> upstream_5xx, invalid request -> upstream_4xx), otherwise "upstream_error".
Tool calls are reported twice. As they stream: meta {"tool_call_delta": {"index", "id",
"name", "arguments": ""}} when a call starts (index: its position among the choice's calls,
0, 1, ...; id and name as the provider gave them, id "call_<index>" when it gave none), then
meta {"tool_call_delta": {"index", "arguments": <the next fragment of its JSON text>}} as
each fragment arrives (a provider that sends a call whole gives its whole text as one
fragment). And whole, as one meta event {"tool_calls": [{"id", "type": "function",
"function": {"name", "arguments": <JSON text>}}]} (OpenAI's shape) just before usage: what a
consumer that does not stream (a non-streamed answer, a thread) reads. Both carry
"choice": i for a choice i > 0. A provider that restates a call's arguments (Responses'
`.done` events) adds a fragment only for what extends the text already sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

from protocols import events
from protocols.sse import SSEParser

MAX_FRAME_BYTES = 8 * 1024 * 1024  # a line/event larger than this is treated as malformed
MAX_MESSAGE_CHARS = 1000  # provider error messages are cut to this length

Headers = list[tuple[bytes, bytes]]


class Malformed(Exception):
    """Raised inside a Parser for a frame that is not what the provider's format allows."""


# --- parsing -------------------------------------------------------------------------


class Parser:
    """Skeleton: subclasses set FRAMING ("sse" or "ndjson") and TERMINATOR (a description
    for the truncation message) and implement on_frame(name, payload)."""

    FRAMING = "sse"
    TERMINATOR = "its terminator"
    # The call's answer is a stream (SSE / NDJSON): a 200 of JSON or HTML is then a failure's
    # page (actors/upstream.py NOT_A_STREAM). False for an answer that is one JSON body.
    STREAMED = True

    def __init__(self) -> None:
        self._sse = SSEParser()
        self._lines = b""
        self._out: list[dict] = []
        self._over = False
        self._finish: str | None = None
        self._usage: dict[str, int | None] = {}
        self._tools: dict[Any, dict] = {}
        self.frames = 0  # frames with data read so far (keepalive comments and empty lines are none)

    # public interface

    def feed(self, chunk: bytes) -> list[dict]:
        self._out = []
        if not self._over and chunk:
            self._guard(self._consume, bytes(chunk))
        return self._out

    def close(self) -> list[dict]:
        self._out = []
        if not self._over:
            self._guard(self.on_eof)
        if not self._over:
            self.fail("upstream_truncated", f"stream ended before {self.TERMINATOR}")
        return self._out

    @property
    def pending_size(self) -> int:
        """Bytes held for a frame not yet complete (a long line still arriving)."""
        return self._sse.pending_size if self.FRAMING == "sse" else len(self._lines)

    # subclass hooks

    def on_frame(self, name: str, payload: str | bytes) -> None:
        raise NotImplementedError

    def on_eof(self) -> None:
        """End of input before the terminator. NDJSON: a last line without its newline."""
        if self.FRAMING == "ndjson" and self._lines.strip():
            line, self._lines = self._lines, b""
            try:
                json.loads(line)
            except ValueError:
                return  # cut mid-line: a truncation, reported by close()
            self.on_frame("", line)

    # emitting

    def emit(self, event: dict) -> None:
        if not self._over:
            self._out.append(event)

    def text(self, value: str | None) -> None:
        if value:
            self.emit(events.delta(value))

    def meta(self, **fields: Any) -> None:
        fields = {k: v for k, v in fields.items() if v not in (None, "", [], {})}
        if fields:
            self.emit(events.meta(**fields))

    def set_finish(self, reason: str | None) -> None:
        if reason and self._finish is None:
            self._finish = reason

    def set_usage(self, prompt: Any = None, completion: Any = None, total: Any = None) -> None:
        for key, value in (("prompt", prompt), ("completion", completion), ("total", total)):
            value = as_int(value)
            if value is not None:
                self._usage[key] = value

    def tool(
        self,
        key: Any,
        *,
        id: Any = None,
        name: Any = None,
        arguments: Any = None,
        append: str | None = None,
        choice: int = 0,
    ) -> None:
        """Create or update the tool call `key` (an index or item id) of choice `choice`, and
        emit what is new of it as a meta(tool_call_delta) (the module docstring)."""
        call = self._tools.get(key)
        if call is None:
            position = sum(1 for c in self._tools.values() if c["choice"] == choice)
            call = self._tools[key] = {
                "id": None,
                "name": None,
                "arguments": "",
                "choice": choice,
                "index": position,
                "started": False,
            }
        before = call["arguments"]
        if isinstance(id, str) and id and not call["started"]:
            call["id"] = id  # once a call has started streaming, its id is the one sent
        if isinstance(name, str) and name:
            call["name"] = name
        if isinstance(arguments, str):
            call["arguments"] = arguments
        elif isinstance(arguments, (dict, list)):
            call["arguments"] = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
        if isinstance(append, str):
            call["arguments"] += append
        self._stream_tool(call, before)

    def _stream_tool(self, call: dict, before: str) -> None:
        where = {"choice": call["choice"]} if call["choice"] else {}
        if not call["started"]:
            call["started"] = True
            call["id"] = call["id"] or f"call_{call['index']}"
            start = {"index": call["index"], "id": call["id"], "name": call["name"] or "", "arguments": ""}
            self.emit(events.meta(tool_call_delta=start, **where))
            before = ""
        after = call["arguments"]
        if len(after) > len(before) and after.startswith(before):
            fragment = {"index": call["index"], "arguments": after[len(before) :]}
            self.emit(events.meta(tool_call_delta=fragment, **where))

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._tools)

    def end(self) -> None:
        """The provider's terminator: flush tool calls, usage and finish; nothing after."""
        if self._over:
            return
        for choice in sorted({call["choice"] for call in self._tools.values()}):
            calls = [
                {
                    "id": call["id"] or f"call_{call['index']}",
                    "type": "function",
                    "function": {"name": call["name"] or "", "arguments": call["arguments"]},
                }
                for call in self._tools.values()
                if call["choice"] == choice
            ]
            self.emit(events.meta(tool_calls=calls, **({"choice": choice} if choice else {})))
        if self._usage:
            u = self._usage
            self.emit(events.usage(u.get("prompt"), u.get("completion"), u.get("total")))
        self.emit(events.finish(self._finish or "stop"))
        self._over = True

    def fail(self, code: str, message: str) -> None:
        if self._over:
            return
        self.emit(events.error(code, clip(message) or code))
        self._over = True

    def provider_error(self, err: Any, default: str = "upstream error") -> None:
        """An in-band error object ({"type"|"code", "message"} or a bare string)."""
        if isinstance(err, dict):
            code = code_for_kind(err.get("type"))
            if code == "upstream_error":
                code = code_for_kind(err.get("code"))
            message = err.get("message")
            self.fail(code, message if isinstance(message, str) and message.strip() else default)
        else:
            self.fail("upstream_error", err if isinstance(err, str) and err else default)

    # helpers for subclasses

    @staticmethod
    def load(payload: str | bytes) -> dict:
        """One frame's JSON object, or Malformed."""
        try:
            obj = json.loads(payload)
        except ValueError as exc:
            raise Malformed(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise Malformed(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    # internals

    def _guard(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Malformed as exc:
            self.fail("upstream_malformed", str(exc))
        except Exception as exc:  # a shape nobody anticipated: still an event, never a raise
            self.fail("upstream_malformed", f"{type(exc).__name__}: {exc}")

    def _consume(self, chunk: bytes) -> None:
        for name, payload in self._frames(chunk):
            self.frames += 1
            self.on_frame(name, payload)
            if self._over:
                return

    def _frames(self, chunk: bytes) -> Iterator[tuple[str, str | bytes]]:
        if self.FRAMING == "sse":
            for sse in self._sse.feed(chunk):
                if sse.data.strip():
                    yield sse.event, sse.data
            if self._sse.pending_size > MAX_FRAME_BYTES:
                # One endless line, or data lines with no blank line to end their event (a
                # provider separating events by a single newline): either would be held whole.
                raise Malformed(f"SSE event longer than {MAX_FRAME_BYTES} bytes")
        else:
            buffer = self._lines + chunk
            *lines, self._lines = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    yield "", line
            if len(self._lines) > MAX_FRAME_BYTES:
                raise Malformed(f"NDJSON line longer than {MAX_FRAME_BYTES} bytes")


def field(obj: dict, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """obj[key] when it has the expected type, default when absent/null, else Malformed."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise Malformed(f"{key!r} has type {type(value).__name__}")
    return value


def text_field(obj: dict, key: str) -> str | None:
    """A content field: a string, OpenAI-style text parts (joined), or absent; else Malformed."""
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return content_text(value)
    raise Malformed(f"{key!r} has type {type(value).__name__}")


def opt_str(obj: dict, key: str) -> str | None:
    """An optional extension field: its value when it is a string, else None (never fails)."""
    value = obj.get(key)
    return value if isinstance(value, str) else None


def as_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def clip(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


_KIND_CODES = {
    "rate_limit_error": "upstream_429",
    "rate_limit_exceeded": "upstream_429",
    "too_many_requests": "upstream_429",
    "insufficient_quota": "upstream_429",
    "authentication_error": "upstream_auth",
    "permission_error": "upstream_auth",
    "invalid_api_key": "upstream_auth",
    "unauthorized": "upstream_auth",
    "invalid_request_error": "upstream_4xx",
    "not_found_error": "upstream_4xx",
    "request_too_large": "upstream_4xx",
    "invalid_prompt": "upstream_4xx",
    "overloaded_error": "upstream_5xx",
    "api_error": "upstream_5xx",
    "server_error": "upstream_5xx",
    "internal_error": "upstream_5xx",
}


def code_for_kind(kind: Any) -> str:
    """Map a provider's error type/code (string, or an HTTP-like number) to our codes."""
    if isinstance(kind, int) and not isinstance(kind, bool):
        return code_for_status(kind)
    if isinstance(kind, str):
        if kind.isdigit():
            return code_for_status(int(kind))
        return _KIND_CODES.get(kind.lower(), "upstream_error")
    return "upstream_error"


# --- HTTP errors (before any stream byte) ---------------------------------------------


def code_for_status(status: int) -> str:
    if status == 429:
        return "upstream_429"
    if status in (401, 403):
        return "upstream_auth"
    if 400 <= status < 500:
        return "upstream_4xx"
    if status >= 500:
        return "upstream_5xx"
    return "upstream_http"


def error_from_response(status: int, headers: Headers, body: bytes, *, now: float | None = None) -> dict:
    """An error event for a non-2xx response: code by status, the provider's own message
    from its error JSON (fallback: the status text), plus "status", and "retry_after_s"
    when the response carries Retry-After (seconds or HTTP date), retry-after-ms (OpenAI)
    and the status is 429 or 5xx."""
    message = message_from_body(body) or status_text(status)
    event = events.error(code_for_status(status), message)
    event["status"] = status
    if status == 429 or status >= 500:
        delay = retry_after(headers, now=now)
        if delay is not None:
            event["retry_after_s"] = delay
    return event


def status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def header(headers: Headers, name: bytes) -> bytes | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def retry_after(headers: Headers, *, now: float | None = None) -> float | None:
    """Seconds to wait from retry-after-ms, or Retry-After as seconds or an HTTP date."""
    raw = header(headers, b"retry-after-ms")
    if raw is not None:
        try:
            value = float(raw.decode("latin-1").strip())
            if value >= 0 and value == value and value != float("inf"):
                return value / 1000.0
        except ValueError:
            pass
    raw = header(headers, b"retry-after")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    try:
        value = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return max(0.0, value)


def message_from_body(body: bytes) -> str | None:
    """The message inside an error JSON body: {"error": {"message"}}, {"error": "..."},
    {"message"}, {"detail"} (also nested lists of those); None when there is none."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return None
    found = _find_message(data, depth=0)
    return clip(found) if found else None


def _find_message(data: Any, depth: int) -> str | None:
    if depth > 4:
        return None
    if isinstance(data, list):
        return _find_message(data[0], depth + 1) if data else None
    if not isinstance(data, dict):
        return None
    for key in ("error", "message", "detail", "msg", "error_message"):
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, (dict, list)):
            found = _find_message(value, depth + 1)
            if found:
                return found
    return None


# --- requests ------------------------------------------------------------------------


def join_url(base_url: str, path: str) -> str:
    """base_url + path, tolerating a trailing slash and a base that already ends in /v1."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[:-3]
    return base + path


def bearer(api_key: str | None) -> Headers:
    return [(b"authorization", b"Bearer " + header_value(api_key))] if api_key else []


def header_value(value: str) -> bytes:
    if any(c in value for c in "\r\n\x00"):
        raise ValueError("header value contains a control character")
    return value.strip().encode("latin-1")


def json_request(
    url: str, auth: Headers, payload: dict, *, accept: bytes = b"text/event-stream"
) -> tuple[str, str, Headers, bytes]:
    headers = [(b"content-type", b"application/json"), (b"accept", accept), *auth]
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return "POST", url, headers, body


def content_text(content: Any) -> str:
    """A message's text: a string, or OpenAI-style parts [{"type": "text", "text"}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def split_system(body: dict) -> tuple[str | None, list[dict]]:
    """(system text, the other messages): body["system"] and every system message,
    joined by blank lines; used by providers that take the system prompt apart."""
    parts = [body["system"]] if isinstance(body.get("system"), str) and body["system"] else []
    rest = []
    for msg in body.get("messages") or []:
        if msg.get("role") in ("system", "developer"):
            text = content_text(msg.get("content"))
            if text:
                parts.append(text)
        else:
            rest.append(msg)
    return ("\n\n".join(parts) if parts else None), rest


def chat_messages(body: dict) -> list[dict]:
    """The messages with body["system"] (if any) prepended as a system message."""
    messages = [dict(m) for m in body.get("messages") or []]
    if isinstance(body.get("system"), str) and body["system"]:
        messages.insert(0, {"role": "system", "content": body["system"]})
    return messages


def copy_fields(body: dict, payload: dict, names: dict[str, str]) -> None:
    """payload[wire_name] = body[name] for each present (not None) field."""
    for name, wire in names.items():
        if body.get(name) is not None:
            payload[wire] = body[name]


# --- fidelity: map every field, or refuse it -----------------------------------------------


class Unsupported(ValueError):
    """A request field a cross-format adapter cannot honour: the edge answers 400 naming it
    (each adapter's `check`), and never drops it silently."""


# A field at its OpenAI default asks nothing of the provider: dropping it changes no answer.
NO_EFFECT: dict[str, Any] = {
    "n": 1,
    "logprobs": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "parallel_tool_calls": True,
    "response_format": {"type": "text"},
    "store": False,
    "modalities": ["text"],
    "tool_choice": "auto",
}


class Fields:
    """The body's fields as one adapter maps them: `take` each it has a counterpart for,
    then `refuse_rest` raises Unsupported for the first one left (null or no-effect values
    aside). "messages" and "system" are every adapter's own business."""

    def __init__(self, body: dict, provider: str):
        self.body, self.provider = body, provider
        self.taken = {"messages", "system"}

    def take(self, name: str) -> Any:
        self.taken.add(name)
        return self.body.get(name)

    def refuse(self, name: str, why: str) -> Unsupported:
        return Unsupported(f"'{name}' cannot be sent to {self.provider}: {why}")

    def refuse_rest(self) -> None:
        for name, value in self.body.items():
            if name in self.taken or value is None or (name in NO_EFFECT and value == NO_EFFECT[name]):
                continue
            raise self.refuse(name, "it has no counterpart in its API (docs/providers.md)")


def refusal(build: Callable[..., object], body: dict) -> str | None:
    """What an adapter's build_request refuses in `body` (Unsupported's message), or None.
    A body whose shape the mapping did not expect (the edge checks OpenAI's types, but a
    mapping reads deeper) is refused too: the client's request, not a gateway failure."""
    try:
        build(base_url="http://check.invalid", api_key=None, model="m", body=body)
    except Unsupported as exc:
        return str(exc)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        return f"the request has a field of a shape this provider's mapping cannot take ({type(exc).__name__}: {exc})"
    return None


def max_tokens(fields: Fields) -> Any:
    """max_tokens, or OpenAI's newer max_completion_tokens (the first present)."""
    first = fields.take("max_tokens")
    second = fields.take("max_completion_tokens")
    return first if first is not None else second


def arguments_object(i: int, call: dict) -> Any:
    """A tool call's arguments (JSON text on OpenAI's wire) as the object other APIs take."""
    text = (call.get("function") or {}).get("arguments") or "{}"
    try:
        return json.loads(text)
    except ValueError:
        raise Unsupported(f"messages[{i}].tool_calls: arguments of {call.get('id')!r} are not JSON") from None


def data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a data: URL with base64 data, else None."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, _, data = url[5:].partition(";base64,")
    return head or "application/octet-stream", data
