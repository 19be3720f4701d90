"""Anthropic Messages API streaming.

Owns: the streaming request for POST /v1/messages and the parse of its SSE stream.
Format: https://docs.anthropic.com/en/docs/build-with-claude/streaming — named events
message_start, content_block_start, content_block_delta, content_block_stop,
message_delta, message_stop, ping, error; there is no [DONE].

    content_block_delta text_delta        -> delta
    content_block_delta thinking_delta    -> meta(reasoning)
    tool_use blocks + input_json_delta    -> meta(tool_calls) at the end
    citations_delta with a url            -> meta(citations=[url])
    message_start / message_delta usage   -> usage (prompt = input + cache tokens)
    message_delta stop_reason             -> finish, normalized to OpenAI's words:
        end_turn, stop_sequence -> "stop"; max_tokens, model_context_window_exceeded ->
        "length"; tool_use -> "tool_calls"; refusal -> "content_filter"; others (e.g.
        pause_turn) kept as Anthropic sends them
    event: error                          -> error (overloaded_error -> upstream_5xx, ...)
    message_stop                          -> terminator; close() without it -> upstream_truncated

Request: x-api-key + anthropic-version 2023-06-01; system messages and body["system"]
are lifted into "system"; max_tokens is required by Anthropic (default 1024); OpenAI-style
tools/tool_choice/stop are translated.
"""
from __future__ import annotations

from typing import Any

from protocols.providers import base
from protocols.providers.base import error_from_response, field, opt_str

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "error_from_response"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
PATH = "/v1/messages"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class Parser(base.Parser):
    TERMINATOR = "event: message_stop"

    def __init__(self) -> None:
        super().__init__()
        self._tool_blocks: set = set()

    def on_frame(self, name: str, payload: str | bytes) -> None:
        event = self.load(payload)
        kind = event.get("type") if isinstance(event.get("type"), str) else name
        if kind == "message_start":
            message = field(event, "message", dict, {})
            self._usage_from(field(message, "usage", dict, {}))
        elif kind == "content_block_start":
            self._block_start(event.get("index"), field(event, "content_block", dict, {}))
        elif kind == "content_block_delta":
            self._block_delta(event.get("index"), field(event, "delta", dict, {}))
        elif kind == "message_delta":
            reason = field(field(event, "delta", dict, {}), "stop_reason", str)
            self.set_finish(FINISH.get(reason, reason) if reason else None)
            self._usage_from(field(event, "usage", dict, {}))
        elif kind == "message_stop":
            self.end()
        elif kind == "error":
            self.provider_error(event.get("error"))
        # ping, content_block_stop and event types added later carry nothing for us

    def _block_start(self, index: object, block: dict) -> None:
        kind = block.get("type")
        if kind == "text":
            self.text(field(block, "text", str))
        elif kind == "thinking":
            self.meta(reasoning=opt_str(block, "thinking"))
        elif kind == "tool_use":
            self._tool_blocks.add(index)
            args = block.get("input")
            self.tool(index, id=block.get("id"), name=block.get("name"), arguments=args if args else None)

    def _block_delta(self, index: object, delta: dict) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            self.text(field(delta, "text", str))
        elif kind == "thinking_delta":
            self.meta(reasoning=field(delta, "thinking", str))
        elif kind == "input_json_delta" and index in self._tool_blocks:
            self.tool(index, append=field(delta, "partial_json", str))
        elif kind == "citations_delta":
            citation = field(delta, "citation", dict, {})
            if opt_str(citation, "url"):
                self.meta(citations=[citation["url"]])

    def _usage_from(self, usage: dict) -> None:
        parts = [base.as_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
        prompt = sum(p for p in parts if p is not None) if parts[0] is not None else None
        self.set_usage(prompt, usage.get("output_tokens"))


def build_request(*, base_url: str, api_key: str | None, model: str, body: dict) -> tuple[str, str, base.Headers, bytes]:
    system, messages = base.split_system(body)
    payload: dict = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS,
        "stream": True,
    }
    if system:
        payload["system"] = system
    base.copy_fields(body, payload, {"temperature": "temperature", "top_p": "top_p"})
    stop = body.get("stop")
    if stop:
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        payload["tools"] = [_tool(t) for t in body["tools"]]
    if body.get("tool_choice") is not None:
        payload["tool_choice"] = _tool_choice(body["tool_choice"])
    auth = [(b"x-api-key", base.header_value(api_key))] if api_key else []
    auth.append((b"anthropic-version", API_VERSION.encode()))
    return base.json_request(base.join_url(base_url, PATH), auth, payload)


def _tool(tool: dict) -> dict:
    """OpenAI {"type": "function", "function": {name, description, parameters}} -> Anthropic."""
    fn = tool.get("function")
    if not isinstance(fn, dict):
        return tool  # already in Anthropic's shape
    out = {"name": fn.get("name"), "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any) -> dict:
    if isinstance(choice, dict):
        if isinstance(choice.get("function"), dict):
            return {"type": "tool", "name": choice["function"].get("name")}
        return choice
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(choice, {"type": "auto"})
