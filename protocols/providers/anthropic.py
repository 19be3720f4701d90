"""Anthropic Messages API streaming.

Owns: the streaming request for POST /v1/messages and the parse of its SSE stream.
Format: https://docs.anthropic.com/en/docs/build-with-claude/streaming — named events
message_start, content_block_start, content_block_delta, content_block_stop,
message_delta, message_stop, ping, error; there is no [DONE].

    content_block_delta text_delta        -> delta
    content_block_delta thinking_delta    -> meta(reasoning)
    tool_use blocks + input_json_delta    -> meta(tool_call_delta) as they stream (start, each
                                             fragment), meta(tool_calls) at the end
    citations_delta with a url            -> meta(citations=[url])
    message_start / message_delta usage   -> usage (prompt = input + cache tokens)
    message_delta stop_reason             -> finish, normalized to OpenAI's words:
        end_turn, stop_sequence -> "stop"; max_tokens, model_context_window_exceeded ->
        "length"; tool_use -> "tool_calls"; refusal -> "content_filter"; others (e.g.
        pause_turn) kept as Anthropic sends them
    event: error                          -> error (overloaded_error -> upstream_5xx, ...)
    message_stop                          -> terminator; close() without it -> upstream_truncated

Request: x-api-key + anthropic-version 2023-06-01; system/developer messages and
body["system"] are lifted into "system"; max_tokens (or max_completion_tokens) is required
by Anthropic (default 1024). Mapped from OpenAI's request (docs/providers.md has the table):
temperature, top_p, top_k, stop -> stop_sequences, tools (a function's `strict` -> the
tool's `strict`), tool_choice, parallel_tool_calls false -> disable_parallel_tool_use, user
-> metadata.user_id, response_format json_schema -> output_config.format, reasoning_effort
(low, medium, high, xhigh, max) -> output_config.effort; messages: text and image parts (data:
URLs as base64 sources, others as url sources), assistant tool_calls -> tool_use blocks,
role tool -> a user turn of tool_result blocks (consecutive results in one turn). Anything
else (seed, logprobs, penalties, n > 1, json_object, message names, audio/file parts)
raises base.Unsupported: `check` names it and the edge answers 400 before admission.

Checked against Anthropic's documentation (docs/providers.md "Cross-format mappings, as
checked"): structured outputs are generally available as `output_config.format` ({"type":
"json_schema", "schema"}) with no beta header; the beta's `output_format` and its
`structured-outputs-2025-11-13` header, which this adapter used to send, are deprecated
(platform.claude.com/docs/en/build-with-claude/structured-outputs). Strict tool use is
`tools[].strict`; effort is `output_config.effort`, no beta header
(platform.claude.com/docs/en/build-with-claude/effort). The shapes match the official
`anthropic` SDK's types (OutputConfigParam, JSONOutputFormatParam, ToolParam.strict,
ToolChoiceAutoParam.disable_parallel_tool_use, MetadataParam.user_id, URLImageSourceParam).
"""

from __future__ import annotations

from typing import Any

from protocols.providers import base
from protocols.providers.base import error_from_response, field, opt_str

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

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
        parts = [
            base.as_int(usage.get(k))
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        ]
        prompt = sum(p for p in parts if p is not None) if parts[0] is not None else None
        self.set_usage(prompt, usage.get("output_tokens"))


# Anthropic's output_config.effort levels: OpenAI's reasoning_effort values it also has, and
# its own "max" (what a /v1/messages client's output_config.effort "max" maps to and back).
EFFORTS = ("low", "medium", "high", "xhigh", "max")


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    fields = base.Fields(body, "anthropic")
    system, _ = base.split_system(body)
    payload: dict = {
        "model": model,
        "messages": _messages(body.get("messages") or []),
        "max_tokens": base.max_tokens(fields) or DEFAULT_MAX_TOKENS,
        "stream": True,
    }
    if system:
        payload["system"] = system
    for name in ("temperature", "top_p", "top_k"):
        if fields.take(name) is not None:
            payload[name] = body[name]
    stop = fields.take("stop")
    if stop:
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if fields.take("tools"):
        payload["tools"] = [_tool(t) for t in body["tools"]]
    if fields.take("tool_choice") is not None:
        payload["tool_choice"] = _tool_choice(body["tool_choice"])
    if fields.take("parallel_tool_calls") is False:
        payload["tool_choice"] = {**payload.get("tool_choice", {"type": "auto"}), "disable_parallel_tool_use": True}
    if fields.take("user") is not None:
        payload["metadata"] = {"user_id": body["user"]}
    output_config: dict = {}
    fmt = fields.take("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        output_config["format"] = {"type": "json_schema", "schema": schema}
    elif fmt is not None and fmt != {"type": "text"}:
        raise fields.refuse(
            "response_format", "Anthropic has structured outputs (json_schema), not JSON mode (json_object)"
        )
    effort = fields.take("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise fields.refuse("reasoning_effort", f"Anthropic's effort levels are {', '.join(EFFORTS)}")
        output_config["effort"] = effort
    if output_config:
        payload["output_config"] = output_config
    fields.refuse_rest()
    auth = [(b"x-api-key", base.header_value(api_key))] if api_key else []
    auth.append((b"anthropic-version", API_VERSION.encode()))
    return base.json_request(base.join_url(base_url, PATH), auth, payload)


def check(body: dict) -> str | None:
    """Why `body` cannot go to Anthropic (a field named), or None."""
    return base.refusal(build_request, body)


def _messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages (system ones aside) as Anthropic turns."""
    out: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("system", "developer"):
            continue
        if msg.get("name") is not None:
            raise base.Unsupported(f"'messages[{i}].name' cannot be sent to anthropic: its messages have no name")
        if role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id"),
                "content": _blocks(i, msg.get("content")),
            }
            last = out[-1] if out else None
            if (
                last
                and last["role"] == "user"
                and isinstance(last["content"], list)
                and all(b.get("type") == "tool_result" for b in last["content"])
            ):
                last["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
        elif role in ("user", "assistant"):
            content = msg.get("content")
            calls = msg.get("tool_calls") or []
            if isinstance(content, str) and not calls:
                out.append({"role": role, "content": content})
                continue
            blocks = [b for b in _blocks(i, content) if b.get("type") != "text" or b["text"]]
            for call in calls:
                fn = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "input": base.arguments_object(i, call),
                    }
                )
            out.append({"role": role, "content": blocks})
        else:
            raise base.Unsupported(f"'messages[{i}].role' {role!r} cannot be sent to anthropic")
    return out


def _blocks(i: int, content: Any) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            found = base.data_url(url)
            source = (
                {"type": "base64", "media_type": found[0], "data": found[1]} if found else {"type": "url", "url": url}
            )
            blocks.append({"type": "image", "source": source})
        else:
            raise base.Unsupported(f"'messages[{i}].content[{j}]' ({kind} part) cannot be sent to anthropic")
    return blocks


def _tool(tool: dict) -> dict:
    """OpenAI {"type": "function", "function": {name, description, parameters}} -> Anthropic."""
    fn = tool.get("function")
    if not isinstance(fn, dict):
        return tool  # already in Anthropic's shape
    out = {"name": fn.get("name"), "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    if isinstance(fn.get("strict"), bool):
        out["strict"] = fn["strict"]  # strict tool use: tools[].strict
    return out


def _tool_choice(choice: Any) -> dict:
    if isinstance(choice, dict):
        if isinstance(choice.get("function"), dict):
            return {"type": "tool", "name": choice["function"].get("name")}
        return choice
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(
        choice, {"type": "auto"}
    )
