"""The coalescing key: which requests are "identical" and may share one upstream call.

Two requests are identical when what goes upstream is the same: provider, model and the
whole normalized body (edge/chat_request.py: the client's body less the fields sluice
owns), so two requests that differ only in `seed`, `logprobs`, `user` or any other field
the provider receives are never merged. Plus the chat thread for thread sends (two threads
with the same history still get answers of their own, stored on their own threads), plus
the client's API key id when coalescing is scoped per key (`COALESCE_SCOPE=key`, the
default with client keys: a follower's role and TTFT would otherwise tell one tenant what
another just asked). The key is a SHA-256 over canonical JSON (sorted keys, no
whitespace), so key order and spacing in the client's JSON do not matter, but a different
temperature or one extra space inside a message does.

Requests that must never share an answer get the empty key: those with tools, tool
choice or function calling (their answers drive side effects), and those whose client
opted out (`"coalesce": false` or header `X-Sluice-Coalesce: off`).

An embeddings request (edge/embeddings.py) has no messages: its `embeddings` object
(input, encoding format, dimensions) is part of the key instead.
"""

from __future__ import annotations

import hashlib
import json

NON_IDEMPOTENT = ("tools", "tool_choice", "functions", "function_call")


def is_idempotent(body: dict) -> bool:
    return not any(body.get(name) for name in NON_IDEMPOTENT)


def coalescing_key(
    provider: str, model: str, body: dict, thread_id: str | None = None, client_id: str | None = None
) -> str:
    """The key for `body` (a normalized request), or "" when it must not be coalesced.
    `client_id`: the API key id when coalescing is scoped per key, else None."""
    if not is_idempotent(body):
        return ""
    canonical = {
        "provider": provider,
        "model": model,
        "body": body,  # exactly what the adapter sends, but for provider and model
        "thread": thread_id,
    }
    if client_id is not None:  # absent otherwise: global keys stay what they were
        canonical["client"] = client_id
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def shard_of(key: str, shards: int, request_id: str) -> int:
    """Which Coalescer shard owns `key` (uncoalescable requests spread by request id)."""
    basis = key or hashlib.sha256(request_id.encode()).hexdigest()
    return int(basis[:8], 16) % shards
