"""Rejection: a request the edge refuses before its stream starts.

One exception type for every refusal — a body that does not parse (edge/chat_request.py's
`RequestError` is one), an unknown provider, a client key's model list or limits, the
Coalescer's or Pacer's 429, a draining gateway. It is raised inside the edge (`Edge.admit`
and the parsing helpers) and rendered at the boundary by each front end in its own error
shape: sluice's `{"error": {"code", "message"}}` (edge/app.py `rejection_response`),
OpenAI's (edge/openai_compat.py), with `Retry-After` when it says when to retry.
"""

from __future__ import annotations


class Rejection(Exception):
    """Refused before streaming: the HTTP status, sluice's error code, a message for the
    client, and when to retry (seconds) for a limit. `type` is the client key table's
    OpenAI error type (edge/api_keys.py `Denial`): sluice's own routes answer those
    refusals in OpenAI's shape, as they answer a missing key."""

    def __init__(
        self, status: int, code: str, message: str, retry_after_s: float | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s, self.type = retry_after_s, type

    def headers(self) -> dict[str, str]:
        """The HTTP headers every front end sends with it: Retry-After in whole seconds."""
        if not self.retry_after_s:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}
