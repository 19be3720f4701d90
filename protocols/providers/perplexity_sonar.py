"""Perplexity Sonar, the legacy OpenAI-compatible POST /chat/completions (retired
2026-09-27 in favour of the Agent API, see perplexity_agent.py).

Owns: the streaming request and the parse of its SSE stream, in the default "full"
stream_mode. Format: https://docs.perplexity.ai/docs/sonar/pro-search/stream-mode and
https://docs.perplexity.ai/api-reference/chat-completions-post — OpenAI-style chunks, where
in full mode every chunk also carries choices[0].message.content = the text ACCUMULATED so
far (next to the incremental delta.content), and repeats citations, search_results and
usage.

    text            -> delta: only the new suffix of message.content (delta.content when
                       the message is absent or does not extend what was already emitted),
                       so text is never duplicated
    citations, search_results -> one meta event when first seen, again only if they change
    usage (every chunk)        -> one usage event at the end (the last values)
    finish_reason              -> finish
    object "chat.completion.done" (concise mode) -> terminator

Perplexity has been seen to end the stream without `data: [DONE]` (github.com/
perplexityai/api-discussion/issues/209), so the terminator is [DONE] or the end of the
input after a chunk with a finish_reason; close() before either -> upstream_truncated.
"""

from __future__ import annotations

from protocols.providers import base, openai_chat
from protocols.providers.base import error_from_response, field, text_field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

DEFAULT_BASE_URL = "https://api.perplexity.ai"
PATH = "/chat/completions"


class Parser(openai_chat.Parser):
    TERMINATOR = "a finish_reason or data: [DONE]"

    def __init__(self) -> None:
        super().__init__()
        self._emitted = ""
        self._sources: dict | None = None

    def on_chunk(self, chunk: dict) -> None:
        sources = {key: field(chunk, key, list) for key in ("citations", "search_results")}
        sources = {key: value for key, value in sources.items() if value}
        if sources and sources != self._sources:
            self._sources = sources
            self.meta(**sources)
        super().on_chunk(chunk)
        if chunk.get("object") == "chat.completion.done":
            self.end()

    def on_choice(self, choice: dict) -> None:
        message = field(choice, "message", dict, {})
        delta = field(choice, "delta", dict, {})
        so_far = text_field(message, "content")
        if so_far is not None and so_far.startswith(self._emitted):
            new = so_far[len(self._emitted) :]
        else:
            new = text_field(delta, "content") or ""
        self._emitted += new
        self.text(new)
        self.set_finish(field(choice, "finish_reason", str))

    def on_eof(self) -> None:
        if self._finish is not None:
            self.end()


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    """The same format as OpenAI chat: the client's body forwarded as it came, but the
    fields sluice owns (Sonar has no stream_options: usage comes on every chunk anyway)."""
    payload = {
        "model": model,
        **{k: v for k, v in body.items() if k != "system"},
        "messages": base.chat_messages(body),
        "stream": True,
    }
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)


def check(body: dict) -> str | None:
    """Nothing to refuse: the same format, every field forwarded."""
    return None
