"""Parsing and validating a chat request body into the normalized upstream request.

Errors are values: `parse_chat` returns a `ChatRequest` or raises `RequestError` carrying
the HTTP status and a message that says what was wrong (400 malformed JSON, 413 too
large, 415 wrong content type, 422 wrong shape; the limits on what any JSON body may hold
are edge/body_limits.py's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from edge.body_limits import BodyError, load_json
from edge.rejections import Rejection
from protocols.keys import NON_IDEMPOTENT, OUTPUT_PARAMS

ROLES = ("system", "user", "assistant", "tool")


class RequestError(Rejection):
    """A body the edge cannot use (a Rejection: every front end renders it as it renders
    any other refusal)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)


@dataclass(frozen=True)
class ChatRequest:
    provider: str | None
    model: str | None
    body: dict  # messages + output params + tools: what goes upstream
    thread_id: str | None
    coalesce: bool
    resumable: bool = False  # "resumable": true, or X-Sluice-Resumable: 1 (edge/app.py)


def check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestError(415, "unsupported_media_type", f"expected content-type application/json, got {media or 'none'!r}")


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
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "invalid_request", "'messages' must be a non-empty array")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(422, "invalid_request", f"messages[{i}] must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RequestError(422, "invalid_request", f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RequestError(422, "invalid_request", f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def _number(data: dict, name: str, low: float, high: float) -> None:
    value = data.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise RequestError(422, "invalid_request", f"'{name}' must be a number between {low:g} and {high:g}")


def _optional_str(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise RequestError(422, "invalid_request", f"'{name}' must be a non-empty string")
    return value


def parse_chat(data: dict, coalesce_header: str | None = None) -> ChatRequest:
    messages = validate_messages(data.get("messages"))
    _number(data, "temperature", 0, 2)
    _number(data, "top_p", 0, 1)
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(422, "invalid_request", "'max_tokens' must be a positive integer")
    stop = data.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise RequestError(422, "invalid_request", "'stop' must be a string or an array of strings")
    coalesce = data.get("coalesce", True)
    if not isinstance(coalesce, bool):
        raise RequestError(422, "invalid_request", "'coalesce' must be true or false")
    if (coalesce_header or "").strip().lower() in ("off", "0", "false", "no"):
        coalesce = False
    resumable = data.get("resumable", False)
    if not isinstance(resumable, bool):
        raise RequestError(422, "invalid_request", "'resumable' must be true or false")
    body = {"messages": messages}
    for name in OUTPUT_PARAMS + NON_IDEMPOTENT:
        if data.get(name) is not None and name != "system":
            body[name] = data[name]
    return ChatRequest(
        provider=_optional_str(data, "provider"),
        model=_optional_str(data, "model"),
        body=body,
        thread_id=_optional_str(data, "thread_id"),
        coalesce=coalesce,
        resumable=resumable,
    )
