"""Anthropic token counting (`POST /v1/messages/count_tokens`): an upstream call whose
"stream" is one JSON body.

Owns: the request for a token count and the parse of its answer, in the same sans-I/O shape
as every adapter, so the Pool runs it like any other call (pacing, retries before the first
byte, cancel, the hub, coalescing). The Pool picks it instead of the provider's chat adapter
when the normalized body is a count request (`is_count_tokens`; protocols/providers
`adapter_for`).
Format: https://docs.anthropic.com/en/api/messages-count-tokens — the request is a Messages
request without `max_tokens` (model, messages, system, tools, tool_choice, thinking, ...);
the answer is `{"input_tokens": int}`.

The normalized body (built by edge/anthropic_compat.py) is `{"count_tokens": <the client's
Anthropic body but its model>}`: the client speaks Anthropic's format and so does the
upstream, so the body goes up as the client sent it, `model` mapped. The answer becomes, at
the end of the response:

    meta(count_tokens={"input_tokens": int, ...})   the provider's object, as sent
    usage(input_tokens, 0)
    finish("stop")

Only Anthropic accounts count tokens this way (`COUNT_TOKENS_ADAPTERS`); the edge refuses a
model routed elsewhere (docs/providers.md "Token counting").
"""

from __future__ import annotations

from protocols.providers import anthropic, base, openai_embeddings
from protocols.providers.base import Malformed, error_from_response, field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

DEFAULT_BASE_URL = anthropic.DEFAULT_BASE_URL
PATH = "/v1/messages/count_tokens"
BODY_FIELD = "count_tokens"  # the normalized body's field that makes it a count request
COUNT_TOKENS_ADAPTERS = frozenset({"anthropic"})


def is_count_tokens(body: dict) -> bool:
    return isinstance(body.get(BODY_FIELD), dict)


class Parser(openai_embeddings.Parser):
    """The answer is read whole (bounded as embeddings' is), then parsed at its end."""

    TERMINATOR = "the end of the JSON body"

    def on_eof(self) -> None:  # close() guards it: a bad body is an upstream_malformed error
        obj = self.load(bytes(self._body))
        if obj.get("type") == "error" or "error" in obj:
            self.provider_error(obj.get("error"))
            return
        count = field(obj, "input_tokens", int)
        if count is None:
            raise Malformed("'input_tokens' is missing")
        self.meta(count_tokens=obj)
        self.set_usage(count, 0)
        self.end()


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    payload = {"model": model, **{k: v for k, v in body[BODY_FIELD].items() if k != "model"}}
    headers = [(b"x-api-key", base.header_value(api_key))] if api_key else []
    headers.append((b"anthropic-version", anthropic.API_VERSION.encode()))
    return base.json_request(
        base.join_url(base_url or DEFAULT_BASE_URL, PATH), headers, payload, accept=b"application/json"
    )


def check(body: dict) -> str | None:
    """Nothing to refuse: Anthropic's own format both ways (the provider judges the body)."""
    return None
