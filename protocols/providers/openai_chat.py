"""OpenAI Chat Completions streaming; also the wire format of sluice's simulated provider.

Owns: the streaming request for POST /v1/chat/completions and the parse of its SSE stream.
Format: https://platform.openai.com/docs/api-reference/chat-streaming — `data:` lines
carrying chat.completion.chunk objects, ended by `data: [DONE]`; with
stream_options.include_usage the last chunk before [DONE] has empty choices and usage.

    choices[0].delta.content                      -> delta
    choices[0].delta.reasoning_content|reasoning  -> meta(reasoning)   (OpenAI-compatible servers)
    choices[0].delta.refusal                      -> meta(refusal)
    choices[0].delta.tool_calls                   -> accumulated; meta(tool_calls) at the end
    choices[0].finish_reason                      -> finish, OpenAI's own value
                                                     (stop, length, tool_calls, content_filter)
    usage                                         -> usage
    {"error": {...}} chunk                        -> error (in-band, as the OpenAI SDK reads it)
    [DONE]                                        -> terminator; close() without it -> upstream_truncated

Only choice index 0 is read (sluice never asks for n > 1). The request sends max_tokens
as max_completion_tokens, the name current OpenAI models accept.
"""
from __future__ import annotations

from protocols.providers import base
from protocols.providers.base import Malformed, error_from_response, field, opt_str, text_field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "error_from_response"]

DEFAULT_BASE_URL = "https://api.openai.com"
PATH = "/v1/chat/completions"


class Parser(base.Parser):
    TERMINATOR = "data: [DONE]"

    def on_frame(self, name: str, payload: str | bytes) -> None:
        if payload.strip() == "[DONE]":
            self.end()
            return
        self.on_chunk(self.load(payload))

    def on_chunk(self, chunk: dict) -> None:
        if chunk.get("error"):
            self.provider_error(chunk["error"])
            return
        for choice in field(chunk, "choices", list, []):
            if not isinstance(choice, dict):
                raise Malformed("a choice is not an object")
            if choice.get("index", 0) == 0:
                self.on_choice(choice)
        usage = field(chunk, "usage", dict)
        if usage:
            self.set_usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens"))

    def on_choice(self, choice: dict) -> None:
        delta = field(choice, "delta", dict, {})
        self.text(text_field(delta, "content"))
        self.meta(reasoning=opt_str(delta, "reasoning_content") or opt_str(delta, "reasoning"))
        self.meta(refusal=opt_str(delta, "refusal"))
        for call in field(delta, "tool_calls", list, []):
            if not isinstance(call, dict):
                raise Malformed("a tool call is not an object")
            fn = field(call, "function", dict, {})
            self.tool(call.get("index", 0), id=call.get("id"), name=fn.get("name"), append=opt_str(fn, "arguments"))
        self.set_finish(field(choice, "finish_reason", str))


def build_request(*, base_url: str, api_key: str | None, model: str, body: dict) -> tuple[str, str, base.Headers, bytes]:
    payload = {
        "model": model,
        "messages": base.chat_messages(body),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    base.copy_fields(body, payload, {
        "temperature": "temperature",
        "top_p": "top_p",
        "max_tokens": "max_completion_tokens",
        "stop": "stop",
        "tools": "tools",
        "tool_choice": "tool_choice",
    })
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)
