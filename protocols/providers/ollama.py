"""Ollama chat (POST /api/chat) streaming.

Owns: the streaming request and the parse of its NDJSON stream.
Format: https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion
— one JSON object per line: {"model", "created_at", "message": {"role", "content"},
"done": false} ..., then {"done": true, "done_reason", "prompt_eval_count",
"eval_count", durations...}; a line {"error": "..."} reports a failure mid-stream.

    message.content                -> delta
    message.thinking               -> meta(reasoning)   (models run with "think")
    message.tool_calls             -> meta(tool_call_delta) (start, the whole arguments as one
                                      fragment); meta(tool_calls) at the end (JSON text)
    done: true                     -> usage (prompt_eval_count, eval_count) and finish
                                      (done_reason, "stop" if absent; "tool_calls" when
                                      tools were called) — the terminator
    {"error": ...}                 -> error("upstream_error", ...)
close() before done:true -> upstream_truncated. A last line without its newline is still
read at close() when it is complete JSON.

Request: no auth by default (a local server); a Bearer header only if an api_key is
given (Ollama behind a proxy or Ollama's hosted API). temperature, top_p, top_k, seed,
presence/frequency_penalty, max_tokens (num_predict) and stop go into "options";
response_format json_object -> format "json", json_schema -> format <schema>; images as
base64 (data: URLs); tool calls and results in Ollama's shape. Anything else (logprobs,
logit_bias, n > 1, message names, image URLs that are not data: URLs) raises
base.Unsupported (`check`: the edge's 400). For a same-format path, point the "openai"
adapter at Ollama's OpenAI-compatible /v1 instead.
"""

from __future__ import annotations

from protocols.providers import base
from protocols.providers.base import Malformed, error_from_response, field, opt_str, text_field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

DEFAULT_BASE_URL = "http://127.0.0.1:11434"
PATH = "/api/chat"


class Parser(base.Parser):
    FRAMING = "ndjson"
    TERMINATOR = '"done": true'

    def on_frame(self, name: str, payload: str | bytes) -> None:
        line = self.load(payload)
        if line.get("error") is not None:
            self.provider_error(line["error"])
            return
        message = field(line, "message", dict, {})
        self.text(text_field(message, "content"))
        self.meta(reasoning=opt_str(message, "thinking"))
        for call in field(message, "tool_calls", list, []):
            if not isinstance(call, dict):
                raise Malformed("a tool call is not an object")
            fn = field(call, "function", dict, {})
            self.tool(len(self._tools), id=call.get("id"), name=fn.get("name"), arguments=fn.get("arguments"))
        done = field(line, "done", bool, False)
        if done:
            self.set_usage(line.get("prompt_eval_count"), line.get("eval_count"))
            reason = opt_str(line, "done_reason") or "stop"
            self.set_finish("tool_calls" if reason == "stop" and self.has_tool_calls else reason)
            self.end()


OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    fields = base.Fields(body, "ollama")
    payload: dict = {"model": model, "messages": _messages(base.chat_messages(body), body), "stream": True}
    options: dict = {}
    for name, option in OPTIONS.items():
        if fields.take(name) is not None:
            options[option] = body[name]
    limit = base.max_tokens(fields)
    if limit is not None:
        options["num_predict"] = limit
    stop = fields.take("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if options:
        payload["options"] = options
    if fields.take("tools"):
        payload["tools"] = body["tools"]
    fmt = fields.take("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        payload["format"] = "json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        payload["format"] = (fmt.get("json_schema") or {}).get("schema") or "json"
    elif fmt is not None and fmt != {"type": "text"}:
        raise fields.refuse("response_format", "Ollama takes json_object or json_schema")
    fields.refuse_rest()
    return base.json_request(
        base.join_url(base_url, PATH), base.bearer(api_key), payload, accept=b"application/x-ndjson"
    )


def check(body: dict) -> str | None:
    """Why `body` cannot go to Ollama's native API (a field named), or None."""
    return base.refusal(build_request, body)


def _messages(messages: list[dict], body: dict) -> list[dict]:
    """OpenAI messages as Ollama's: text content, images as base64 (data: URLs only),
    tool_calls with arguments as objects, tool results with the called tool's name."""
    names = {}
    out = []
    offset = len(messages) - len(body.get("messages") or [])  # errors name the client's index
    for i, msg in enumerate(messages):
        where = i - offset
        if msg.get("name") is not None:
            raise base.Unsupported(f"'messages[{where}].name' cannot be sent to ollama: its messages have no name")
        role = "system" if msg.get("role") == "developer" else msg.get("role")
        if role == "function":
            raise base.Unsupported(f"'messages[{where}].role' 'function' cannot be sent to ollama")
        item: dict = {"role": role, "content": base.content_text(msg.get("content"))}
        images = []
        parts = msg.get("content")
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            if part.get("type") == "image_url":
                found = base.data_url((part.get("image_url") or {}).get("url", ""))
                if found is None:
                    raise base.Unsupported(
                        f"'messages[{where}].content[{j}]' cannot be sent to ollama: images must be data: URLs"
                    )
                images.append(found[1])
            elif part.get("type") != "text":
                raise base.Unsupported(
                    f"'messages[{where}].content[{j}]' ({part.get('type')} part) cannot be sent to ollama"
                )
        if images:
            item["images"] = images
        calls = msg.get("tool_calls") or []
        if calls:
            item["tool_calls"] = [
                {
                    "function": {
                        "name": (c.get("function") or {}).get("name"),
                        "arguments": base.arguments_object(where, c),
                    }
                }
                for c in calls
            ]
            names.update({c.get("id"): (c.get("function") or {}).get("name") for c in calls})
        if role == "tool" and names.get(msg.get("tool_call_id")):
            item["tool_name"] = names[msg["tool_call_id"]]
        out.append(item)
    return out
