"""Normalized stream events: what every provider adapter emits and every client receives.

Adapter output (protocols/providers/*):
    {"type": "delta", "delta": str}
    {"type": "meta", ...}            provider extras: citations, search_results, reasoning,
                                     tool calls (whole: "tool_calls"; as they stream:
                                     "tool_call_delta", protocols/providers/base.py)
    {"type": "usage", "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    {"type": "finish", "reason": str}
    {"type": "error", "code": str, "message": str}

Stream events (the Pool's hub, the edge, the client) add:
    {"type": "started", "first_byte_at": float, "queue_wait_ms": float,
     "attempts": int, "provider_ttft_ms": float | None,
     "provider", "model", "key"?, "fallback_from"?}                        (internal, first)
    {"type": "done", "finish_reason": str, "usage": dict | None}          (terminal)
and keep "error" as the other terminal event. A stream has exactly one terminal event.
"""

from __future__ import annotations

from typing import Any

DELTA, META, USAGE, FINISH, ERROR = "delta", "meta", "usage", "finish", "error"
STARTED, DONE = "started", "done"
TERMINAL = frozenset({DONE, ERROR})


def delta(text: str) -> dict:
    return {"type": DELTA, "delta": text}


def meta(**fields: object) -> dict:
    return {"type": META, **fields}


def usage(prompt_tokens: int | None, completion_tokens: int | None, total_tokens: int | None = None) -> dict:
    if total_tokens is None and prompt_tokens is not None and completion_tokens is not None:
        total_tokens = prompt_tokens + completion_tokens
    return {
        "type": USAGE,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
        },
    }


def finish(reason: str) -> dict:
    return {"type": FINISH, "reason": reason}


def error(code: str, message: str) -> dict:
    return {"type": ERROR, "code": code, "message": message}


def started(
    first_byte_at: float,
    queue_wait_ms: float,
    attempts: int = 1,
    *,
    provider_ttft_ms: float | None = None,
    **served: Any,
) -> dict:
    """`served`: who answered (provider, model; key "#n" for an account of several keys;
    fallback_from when the call fell back), for the client's meta event.
    `provider_ttft_ms`: the provider's TTFT (first attempt sent -> first byte, on the Pool's
    clock), so the edge can tell its own added TTFT apart (docs/operations.md)."""
    return {
        "type": STARTED,
        "first_byte_at": first_byte_at,
        "queue_wait_ms": queue_wait_ms,
        "attempts": attempts,
        "provider_ttft_ms": provider_ttft_ms,
        **served,
    }


def done(finish_reason: str, usage: dict | None = None) -> dict:
    return {"type": DONE, "finish_reason": finish_reason, "usage": usage}


def is_terminal(event: dict) -> bool:
    return event.get("type") in TERMINAL
