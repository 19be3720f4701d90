"""OpenAI Responses API streaming.

Owns: the streaming request for POST /v1/responses and the parse of its SSE stream.
Format: https://platform.openai.com/docs/api-reference/responses-streaming — typed events
(`event: <type>` plus a JSON object whose "type" repeats it); no [DONE].

    response.output_text.delta                      -> delta
    response.reasoning_summary_text.delta,
    response.reasoning_text.delta                   -> meta(reasoning)
    response.refusal.delta                          -> meta(refusal)
    response.output_text.annotation.added (url)     -> meta(citations=[url])
    function_call items + function_call_arguments.* -> meta(tool_calls) at the end
    response.completed                              -> usage, finish "stop" ("tool_calls"
                                                       when the response called tools)
    response.incomplete                             -> usage, finish from incomplete_details
                                                       (max_output_tokens -> "length",
                                                       content_filter kept)
    response.failed / error                         -> error
    completed / incomplete are the terminator; close() before them -> upstream_truncated.

The event type is read from the JSON "type", else from the SSE event name (Perplexity's
Agent API, which reuses this parser, sends only the latter). perplexity_agent.py extends
Parser.on_event for Perplexity's extra events.
"""
from __future__ import annotations

from typing import Any

from protocols.providers import base
from protocols.providers.base import error_from_response, field, opt_str

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "error_from_response"]

DEFAULT_BASE_URL = "https://api.openai.com"
PATH = "/v1/responses"

INCOMPLETE: dict[str | None, str] = {"max_output_tokens": "length", "content_filter": "content_filter"}


class Parser(base.Parser):
    TERMINATOR = "response.completed"

    def on_frame(self, name: str, payload: str | bytes) -> None:
        if payload.strip() == "[DONE]":
            return  # not part of this format; harmless if a proxy adds it
        event = self.load(payload)
        kind = event["type"] if isinstance(event.get("type"), str) else name
        self.on_event(kind, event)

    def on_event(self, kind: str, event: dict) -> None:
        if kind == "response.output_text.delta":
            self.text(field(event, "delta", str))
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            self.meta(reasoning=field(event, "delta", str))
        elif kind == "response.refusal.delta":
            self.meta(refusal=field(event, "delta", str))
        elif kind == "response.output_text.annotation.added":
            url = opt_str(field(event, "annotation", dict, {}), "url")
            self.meta(citations=[url] if url else None)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self.on_item(field(event, "item", dict, {}), event.get("output_index"), done=kind.endswith(".done"))
        elif kind == "response.function_call_arguments.delta":
            self.tool(self._key(event.get("item_id"), event.get("output_index")), append=field(event, "delta", str))
        elif kind == "response.function_call_arguments.done":
            self.tool(self._key(event.get("item_id"), event.get("output_index")), arguments=field(event, "arguments", str))
        elif kind in ("response.completed", "response.incomplete"):
            response = field(event, "response", dict, {})
            usage = field(response, "usage", dict, {})
            self.set_usage(usage.get("input_tokens"), usage.get("output_tokens"), usage.get("total_tokens"))
            if kind == "response.incomplete":
                reason = opt_str(field(response, "incomplete_details", dict, {}), "reason")
                self.set_finish(INCOMPLETE.get(reason, reason) or "length")
            else:
                self.set_finish("tool_calls" if self.has_tool_calls else "stop")
            self.end()
        elif kind == "response.failed":
            response = field(event, "response", dict, {})
            self.provider_error(event.get("error") or response.get("error"), "response failed")
        elif kind == "error":
            self.provider_error(event["error"] if isinstance(event.get("error"), dict) else event)

    def on_item(self, item: dict, output_index: object, *, done: bool) -> None:
        if item.get("type") == "function_call":
            args = opt_str(item, "arguments")
            self.tool(self._key(item.get("id"), output_index), id=item.get("call_id"), name=item.get("name"),
                      arguments=args if done or args else None)

    @staticmethod
    def _key(item_id: object, output_index: object) -> object:
        return item_id if isinstance(item_id, str) and item_id else output_index


def build_request(*, base_url: str, api_key: str | None, model: str, body: dict) -> tuple[str, str, base.Headers, bytes]:
    system, messages = base.split_system(body)
    payload: dict = {
        "model": model,
        "input": [{"role": m.get("role"), "content": m.get("content")} for m in messages],
        "stream": True,
    }
    if system:
        payload["instructions"] = system
    base.copy_fields(body, payload, {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_output_tokens"})
    if body.get("tools"):
        payload["tools"] = [flat_tool(t) for t in body["tools"]]
    if body.get("tool_choice") is not None:
        payload["tool_choice"] = flat_tool_choice(body["tool_choice"])
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)


def flat_tool(tool: dict) -> dict:
    """Chat-style {"type": "function", "function": {...}} -> Responses-style flat tool."""
    fn = tool.get("function")
    return {"type": "function", **fn} if isinstance(fn, dict) else tool


def flat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "function", "name": choice["function"].get("name")}
    return choice
