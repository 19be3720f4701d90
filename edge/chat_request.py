"""Parsing and validating a chat request body into the normalized upstream request.

Errors are values: `parse_chat` returns a `ChatRequest` or raises `RequestError` carrying
the HTTP status and a message that says what was wrong (400 malformed JSON, 413 too
large, 415 wrong content type, 422 wrong shape; the limits on what any JSON body may hold
are edge/body_limits.py's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from edge.body_limits import BodyError, load_json
from edge.rejections import Rejection
from protocols.providers.anthropic_count_tokens import BODY_FIELD as COUNT_TOKENS_FIELD
from protocols.providers.openai_embeddings import BODY_FIELD as EMBEDDINGS_FIELD

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# The body fields that are sluice's, not the provider's: they choose where the request goes
# and how it is streamed back, and are never forwarded as they came (docs/providers.md).
# `stream`/`stream_options` are the edge's to answer (the upstream call always streams);
# `model`/`provider` are mapped. (`system`, sluice's shorthand for a leading system message,
# stays in the body: each adapter turns it into its provider's system prompt.)
OWNED = ("provider", "model", "thread_id", "coalesce", "resumable", "stream", "stream_options")
# The normalized body's fields that make a call another kind than chat (an embeddings or a
# token count call: protocols/providers adapter_for). Only their own routes set them; taken
# from a chat body as it came, they would turn the chat request into that call, past the
# route's own checks, answered as an empty chat answer.
CALL_KIND_FIELDS = (EMBEDDINGS_FIELD, COUNT_TOKENS_FIELD)
CONTENT_PARTS = ("text", "image_url", "input_audio", "file", "refusal")
# X-Sluice-Coalesce values that turn coalescing off for one request, whatever the body says.
COALESCE_OFF = ("off", "0", "false", "no")

# Each front end words and numbers its refusals its own way (422 "'x' must ..." here, 400
# "x: must ..." in Anthropic's): the shared parsers below take the front end's own
# `refuse(field, message)` and raise what it returns.
Refuse = Callable[[str, str], Exception]


class RequestError(Rejection):
    """A body the edge cannot use (a Rejection: every front end renders it as it renders
    any other refusal)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)


@dataclass(frozen=True)
class ChatRequest:
    provider: str | None
    model: str | None
    body: dict  # the client's body less the fields sluice owns (OWNED): what goes upstream
    thread_id: str | None
    coalesce: bool
    resumable: bool = False  # "resumable": true, or X-Sluice-Resumable: 1 (edge/app.py)


def check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestError(
            415, "unsupported_media_type", f"expected content-type application/json, got {media or 'none'!r}"
        )


def check_content_encoding(encoding: str | None) -> None:
    """The body is read as sent: a compressed one would be parsed as JSON and refused as
    malformed (misleading), a plain one labelled compressed served as if it were not. A
    content coding the edge does not decode is a 415 (RFC 9110, 15.5.16)."""
    coding = (encoding or "").strip().lower()
    if coding not in ("", "identity"):
        raise RequestError(
            415, "unsupported_media_type", f"content-encoding {coding!r} is not supported: send the body uncompressed"
        )


def parse_json(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise RequestError(413, "body_too_large", f"request body is {len(raw)} bytes; the limit is {limit}")
    try:
        data = load_json(raw)  # what it refuses, and why: edge/body_limits.py
    except BodyError as exc:
        raise RequestError(exc.status, exc.code, exc.message) from None
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_request", "request body must be a JSON object")
    return data


def validate_messages(messages) -> list[dict]:
    """The messages as the client sent them (copies), once each has a shape a provider
    can take: OpenAI's message shapes (content as text or parts, `content: null` next to
    `tool_calls`, `role: tool` with its `tool_call_id`, `name`). Nothing is rewritten."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "invalid_request", "'messages' must be a non-empty array")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(422, "invalid_request", f"messages[{i}] must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RequestError(422, "invalid_request", f"messages[{i}].role must be one of {', '.join(ROLES)}")
        calls = msg.get("tool_calls")
        if calls is not None:
            _tool_calls(i, role, calls)
        if content is None and role == "assistant" and (calls or msg.get("function_call")):
            pass  # an assistant turn that only called tools
        elif isinstance(content, list) and content:
            _parts(i, content)
        elif not isinstance(content, str):
            raise RequestError(
                422, "invalid_request", f"messages[{i}].content must be a string or an array of content parts"
            )
        if role == "tool" and (not isinstance(msg.get("tool_call_id"), str) or not msg["tool_call_id"]):
            raise RequestError(
                422, "invalid_request", f"messages[{i}].tool_call_id must be a non-empty string (role tool)"
            )
        if msg.get("name") is not None and (not isinstance(msg["name"], str) or not msg["name"]):
            raise RequestError(422, "invalid_request", f"messages[{i}].name must be a non-empty string")
        out.append(dict(msg))
    return out


def _parts(i: int, parts: list) -> None:
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in CONTENT_PARTS:
            raise RequestError(
                422, "invalid_request", f"messages[{i}].content[{j}].type must be one of {', '.join(CONTENT_PARTS)}"
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise RequestError(422, "invalid_request", f"messages[{i}].content[{j}].text must be a string")
        if kind == "image_url":
            image = part.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
                raise RequestError(
                    422, "invalid_request", f"messages[{i}].content[{j}].image_url.url must be a non-empty string"
                )


def _tool_calls(i: int, role: str, calls) -> None:
    if role != "assistant" or not isinstance(calls, list):
        raise RequestError(422, "invalid_request", f"messages[{i}].tool_calls must be an array on an assistant message")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            raise RequestError(
                422,
                "invalid_request",
                f"messages[{i}].tool_calls[{j}] must be {{id, type: function, function: {{name, arguments: string}}}}",
            )


def check_number(data: dict, name: str, high: float, refuse: Refuse) -> None:
    """A sampling setting (`temperature`, `top_p`), when given: a finite number in [0, high]."""
    value = data.get(name)
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= high
    ):
        raise refuse(name, f"must be a number between 0 and {high:g}")


def _optional_str(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise RequestError(422, "invalid_request", f"'{name}' must be a non-empty string")
    return value


def refuse_field(field: str, message: str) -> RequestError:
    """The OpenAI-shaped front ends' refusal of one field (422, "'field' must ...")."""
    return RequestError(422, "invalid_request", f"'{field}' {message}")


def parse_coalesce(data: dict, header: str | None, refuse: Refuse) -> bool:
    """Whether this request may share an upstream call: the body's `coalesce` (default true),
    turned off by an X-Sluice-Coalesce header of off/0/false/no."""
    coalesce = data.get("coalesce", True)
    if not isinstance(coalesce, bool):
        raise refuse("coalesce", "must be true or false")
    if (header or "").strip().lower() in COALESCE_OFF:
        coalesce = False
    return coalesce


def parse_stream(data: dict, refuse: Refuse) -> bool:
    """The body's `stream` (absent or null: false)."""
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise refuse("stream", "must be true or false")
    return stream


def parse_tools(
    data: dict, tool: Callable[[int, object], dict], tool_choice: Callable[[object], object], refuse: Refuse
) -> dict:
    """The normalized body's `tools` and `tool_choice`, each only where the client gave one
    (an empty `tools` array gives none); `tool(i, t)` and `tool_choice(c)` translate the
    front end's own shapes."""
    fields: dict = {}
    tools = data.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise refuse("tools", "must be an array")
        if tools:
            fields["tools"] = [tool(i, t) for i, t in enumerate(tools)]
    if data.get("tool_choice") is not None:
        fields["tool_choice"] = tool_choice(data["tool_choice"])
    return fields


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# OpenAI's types for the chat fields a cross-format adapter maps (the values are OpenAI's
# own API's, so a request OpenAI takes is never refused): a value of the wrong type is a 422
# naming the field here, on every provider, instead of reaching an adapter's mapping.
OPENAI_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "seed": (_is_int, "an integer"),
    "logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "top_logprobs": (lambda v: _is_int(v) and 0 <= v <= 20, "an integer between 0 and 20"),
    "presence_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number between -2 and 2"),
    "frequency_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number between -2 and 2"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "true or false"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
    "reasoning_effort": (lambda v: isinstance(v, str), "a string"),
    "tool_choice": (lambda v: isinstance(v, (str, dict)), "a string or an object"),
    "response_format": (
        lambda v: isinstance(v, dict) and isinstance(v.get("type"), str),
        "an object with a string type",
    ),
    "tools": (lambda v: isinstance(v, list), "an array"),
}


def check_openai_types(data: dict) -> None:
    """RequestError (422, naming the field) for a value of a type OpenAI's API does not take."""
    for name, (ok, what) in OPENAI_TYPES.items():
        if data.get(name) is not None and not ok(data[name]):
            raise RequestError(422, "invalid_request", f"'{name}' must be {what}")
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise RequestError(422, "invalid_request", "'response_format' of type json_schema needs a json_schema object")
    for i, tool in enumerate(data.get("tools") or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or ("function" in tool and not (isinstance(fn, dict) and fn.get("name"))):
            raise RequestError(
                422, "invalid_request", f"tools[{i}] must be an object ({{type: function, function: {{name, ...}}}})"
            )
        if isinstance(fn, dict) and (not isinstance(fn["name"], str) or not isinstance(fn.get("parameters", {}), dict)):
            raise RequestError(
                422, "invalid_request", f"tools[{i}].function needs a string name and an object of parameters"
            )


def parse_chat(data: dict, coalesce_header: str | None = None) -> ChatRequest:
    for name in CALL_KIND_FIELDS:
        if name in data:
            raise RequestError(400, "unsupported_parameter", f"'{name}' is not a chat parameter")
    messages = validate_messages(data.get("messages"))
    check_number(data, "temperature", 2, refuse_field)
    check_number(data, "top_p", 1, refuse_field)
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(422, "invalid_request", "'max_tokens' must be a positive integer")
    stop = data.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise RequestError(422, "invalid_request", "'stop' must be a string or an array of strings")
    coalesce = parse_coalesce(data, coalesce_header, refuse_field)
    resumable = data.get("resumable", False)
    if not isinstance(resumable, bool):
        raise RequestError(422, "invalid_request", "'resumable' must be true or false")
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128):
        raise RequestError(422, "invalid_request", "'n' must be an integer between 1 and 128")
    check_openai_types(data)
    # Everything the client sent goes upstream as it came, but for the fields sluice owns.
    body = {name: value for name, value in data.items() if name not in OWNED}
    body["messages"] = messages
    return ChatRequest(
        provider=_optional_str(data, "provider"),
        model=_optional_str(data, "model"),
        body=body,
        thread_id=_optional_str(data, "thread_id"),
        coalesce=coalesce,
        resumable=resumable,
    )
