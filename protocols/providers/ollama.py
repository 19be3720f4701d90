"""Ollama chat (POST /api/chat) streaming.

Owns: the streaming request and the parse of its NDJSON stream.
Format: https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion
— one JSON object per line: {"model", "created_at", "message": {"role", "content"},
"done": false} ..., then {"done": true, "done_reason", "prompt_eval_count",
"eval_count", durations...}; a line {"error": "..."} reports a failure mid-stream.

    message.content                -> delta
    message.thinking               -> meta(reasoning)   (models run with "think")
    message.tool_calls             -> meta(tool_calls) at the end (arguments as JSON text)
    done: true                     -> usage (prompt_eval_count, eval_count) and finish
                                      (done_reason, "stop" if absent; "tool_calls" when
                                      tools were called) — the terminator
    {"error": ...}                 -> error("upstream_error", ...)
close() before done:true -> upstream_truncated. A last line without its newline is still
read at close() when it is complete JSON.

Request: no auth by default (a local server); a Bearer header only if an api_key is
given (Ollama behind a proxy or Ollama's hosted API). temperature, top_p, max_tokens
(num_predict) and stop go into "options".
"""
from __future__ import annotations

from protocols.providers import base
from protocols.providers.base import Malformed, error_from_response, field, opt_str, text_field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "error_from_response"]

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


def build_request(*, base_url: str, api_key: str | None, model: str, body: dict) -> tuple[str, str, base.Headers, bytes]:
    messages = [{**m, "content": base.content_text(m.get("content"))} for m in base.chat_messages(body)]
    payload: dict = {"model": model, "messages": messages, "stream": True}
    options: dict = {}
    base.copy_fields(body, options, {"temperature": "temperature", "top_p": "top_p", "max_tokens": "num_predict"})
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if options:
        payload["options"] = options
    if body.get("tools"):
        payload["tools"] = body["tools"]
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload, accept=b"application/x-ndjson")
