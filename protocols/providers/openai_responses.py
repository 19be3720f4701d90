"""OpenAI Responses API streaming.

Owns: the streaming request for POST /v1/responses and the parse of its SSE stream.
Format: https://platform.openai.com/docs/api-reference/responses-streaming — typed events
(`event: <type>` plus a JSON object whose "type" repeats it); no [DONE].

    response.output_text.delta                      -> delta
    response.reasoning_summary_text.delta,
    response.reasoning_text.delta                   -> meta(reasoning)
    response.refusal.delta                          -> meta(refusal)
    response.output_text.annotation.added (url)     -> meta(citations=[url])
    function_call items + function_call_arguments.* -> meta(tool_call_delta) as they stream;
                                                       meta(tool_calls) at the end
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

Request, mapped from OpenAI chat (docs/providers.md): system/developer -> instructions;
messages -> input items (text/image parts, function_call and function_call_output items
for tool calls and results); max_tokens -> max_output_tokens; response_format -> text.format;
reasoning_effort -> reasoning.effort; temperature, top_p, tools (flattened), tool_choice,
parallel_tool_calls, user, metadata, store, service_tier as they are. Anything else (seed,
stop, logprobs, penalties, n > 1, message names) raises base.Unsupported (`check`: 400).

Checked against OpenAI's API reference as the official `openai` SDK's types (generated from
OpenAI's OpenAPI spec) give it (docs/providers.md "Cross-format mappings, as checked"):
text.format json_schema is flat ({"type", "name", "schema", "strict"?, "description"?}),
tool_choice for a function is {"type": "function", "name"}, reasoning is {"effort"}. A
Responses function tool names `strict` and `parameters` as required keys, where chat's
defaults are non-strict and "no parameters": a chat tool that says nothing is sent with
`strict: false` (and an empty parameter object), so it keeps chat's meaning instead of
taking whatever the Responses API assumes for a missing key.
"""

from __future__ import annotations

from typing import Any

from protocols.providers import base
from protocols.providers.base import error_from_response, field, opt_str

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

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
            self.tool(
                self._key(event.get("item_id"), event.get("output_index")), arguments=field(event, "arguments", str)
            )
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
            self.tool(
                self._key(item.get("id"), output_index),
                id=item.get("call_id"),
                name=item.get("name"),
                arguments=args if done or args else None,
            )

    @staticmethod
    def _key(item_id: object, output_index: object) -> object:
        return item_id if isinstance(item_id, str) and item_id else output_index


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    fields = base.Fields(body, "openai_responses")
    system, _ = base.split_system(body)
    payload: dict = {
        "model": model,
        "input": input_items(body.get("messages") or [], "openai_responses"),
        "stream": True,
    }
    if system:
        payload["instructions"] = system
    for name in ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "store", "service_tier"):
        if fields.take(name) is not None:
            payload[name] = body[name]
    if base.max_tokens(fields) is not None:
        payload["max_output_tokens"] = body.get("max_tokens") or body.get("max_completion_tokens")
    if fields.take("tools"):
        payload["tools"] = [flat_tool(t) for t in body["tools"]]
    if fields.take("tool_choice") is not None:
        payload["tool_choice"] = flat_tool_choice(body["tool_choice"])
    if fields.take("reasoning_effort") is not None:
        payload["reasoning"] = {"effort": body["reasoning_effort"]}
    fmt = fields.take("response_format")
    if fmt is not None:
        payload["text"] = {"format": text_format(fmt)}
    fields.refuse_rest()
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)


def check(body: dict) -> str | None:
    """Why `body` cannot go to the Responses API (a field named), or None."""
    return base.refusal(build_request, body)


def text_format(fmt: Any) -> Any:
    """Chat's response_format -> Responses' text.format (json_schema is flattened)."""
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        return {"type": "json_schema", **fmt["json_schema"]}
    return fmt


def input_items(messages: list[dict], provider: str) -> list[dict]:
    """OpenAI chat messages (system ones aside) as Responses input items: messages with
    input_text/input_image (output_text for the assistant) parts, assistant tool calls as
    function_call items, tool results as function_call_output items."""
    items: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("system", "developer"):
            continue
        if msg.get("name") is not None:
            raise base.Unsupported(f"'messages[{i}].name' cannot be sent to {provider}: its input items have no name")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": msg.get("tool_call_id"),
                    "output": base.content_text(msg.get("content")),
                }
            )
            continue
        if role not in ("user", "assistant"):
            raise base.Unsupported(f"'messages[{i}].role' {role!r} cannot be sent to {provider}")
        content = msg.get("content")
        if isinstance(content, list):
            content = [_part(i, j, part, role, provider) for j, part in enumerate(content)]
        if content:
            items.append({"role": role, "content": content})
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id"),
                    "name": fn.get("name"),
                    "arguments": fn.get("arguments"),
                }
            )
    return items


def _part(i: int, j: int, part: dict, role: str, provider: str) -> dict:
    kind = part.get("type")
    if kind == "text":
        return {"type": "output_text" if role == "assistant" else "input_text", "text": part.get("text", "")}
    if kind == "image_url" and role == "user":
        image = part.get("image_url") or {}
        out = {"type": "input_image", "image_url": image.get("url")}
        if image.get("detail"):
            out["detail"] = image["detail"]
        return out
    raise base.Unsupported(f"'messages[{i}].content[{j}]' ({kind} part) cannot be sent to {provider}")


def flat_tool(tool: dict) -> dict:
    """Chat-style {"type": "function", "function": {...}} -> Responses-style flat tool, with
    chat's defaults spelled out: not strict, no parameters (the module docstring)."""
    fn = tool.get("function")
    if not isinstance(fn, dict):
        return tool
    return {"type": "function", "parameters": {"type": "object", "properties": {}}, "strict": False, **fn}


def flat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "function", "name": choice["function"].get("name")}
    return choice
