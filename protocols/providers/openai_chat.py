"""OpenAI Chat Completions streaming; also the wire format of sluice's simulated provider.

Owns: the streaming request for POST /v1/chat/completions and the parse of its SSE stream.
Format: https://platform.openai.com/docs/api-reference/chat-streaming — `data:` lines
carrying chat.completion.chunk objects, ended by `data: [DONE]`; with
stream_options.include_usage the last chunk before [DONE] has empty choices and usage.

    choices[i].delta.content                      -> delta (with choices[i].logprobs when sent)
    choices[i].delta.reasoning_content|reasoning  -> meta(reasoning)   (OpenAI-compatible servers)
    choices[i].delta.refusal                      -> meta(refusal)
    choices[i].delta.tool_calls                   -> meta(tool_call_delta) as they stream (start,
                                                     each fragment); meta(tool_calls) at the end
    choices[0].finish_reason                      -> finish, OpenAI's own value
                                                     (stop, length, tool_calls, content_filter)
    choices[i>0].finish_reason                    -> meta(finish_reason) at the end
    system_fingerprint                            -> meta(system_fingerprint), when it changes
    usage                                         -> usage
    {"error": {...}} chunk                        -> error (in-band, as the OpenAI SDK reads it)
    [DONE]                                        -> terminator; close() without it -> upstream_truncated

Every event of choice i > 0 (a request with n > 1) carries "choice": i; choice 0's do not.

The request is the client's body as it came (docs/providers.md "Fidelity"): every field
is forwarded unchanged but those sluice owns — `model` (mapped), `stream` (always true)
and `stream_options` (always include_usage) — and sluice's own `system` shorthand, which
becomes a leading system message. So this adapter never refuses a field (`check` -> None):
the provider itself judges what it does not know.
"""

from __future__ import annotations

from protocols import events
from protocols.providers import base
from protocols.providers.base import Malformed, error_from_response, field, opt_str, text_field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

DEFAULT_BASE_URL = "https://api.openai.com"
PATH = "/v1/chat/completions"


class Parser(base.Parser):
    TERMINATOR = "data: [DONE]"

    def __init__(self) -> None:
        super().__init__()
        self._fingerprint: str | None = None
        self._finishes: dict[int, str] = {}  # choice i > 0 -> its finish_reason

    def on_frame(self, name: str, payload: str | bytes) -> None:
        if payload.strip() == "[DONE]":
            for index, reason in sorted(self._finishes.items()):
                self.emit(events.meta(finish_reason=reason, choice=index))
            self.end()
            return
        self.on_chunk(self.load(payload))

    def on_chunk(self, chunk: dict) -> None:
        if chunk.get("error"):
            self.provider_error(chunk["error"])
            return
        fingerprint = opt_str(chunk, "system_fingerprint")
        if fingerprint and fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self.meta(system_fingerprint=fingerprint)
        for choice in field(chunk, "choices", list, []):
            if not isinstance(choice, dict):
                raise Malformed("a choice is not an object")
            index = choice.get("index", 0)
            if index == 0:
                self.on_choice(choice)
            elif isinstance(index, int) and not isinstance(index, bool) and index > 0:
                self.read_choice(choice, index)
        usage = field(chunk, "usage", dict)
        if usage:
            self.set_usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens"))

    def on_choice(self, choice: dict) -> None:
        self.read_choice(choice, 0)

    def read_choice(self, choice: dict, index: int) -> None:
        delta = field(choice, "delta", dict, {})
        text = text_field(delta, "content")
        logprobs = field(choice, "logprobs", dict)
        if logprobs:
            self.at(index, {**events.delta(text or ""), "logprobs": logprobs})
        elif text:
            self.at(index, events.delta(text))
        reasoning = opt_str(delta, "reasoning_content") or opt_str(delta, "reasoning")
        if reasoning:
            self.at(index, events.meta(reasoning=reasoning))
        if opt_str(delta, "refusal"):
            self.at(index, events.meta(refusal=delta["refusal"]))
        for call in field(delta, "tool_calls", list, []):
            if not isinstance(call, dict):
                raise Malformed("a tool call is not an object")
            fn = field(call, "function", dict, {})
            key = call.get("index", 0) if index == 0 else (index, call.get("index", 0))
            self.tool(key, id=call.get("id"), name=fn.get("name"), append=opt_str(fn, "arguments"), choice=index)
        reason = field(choice, "finish_reason", str)
        if index == 0:
            self.set_finish(reason)
        elif reason:
            self._finishes.setdefault(index, reason)

    def at(self, index: int, event: dict) -> None:
        self.emit({**event, "choice": index} if index else event)


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    payload = {name: value for name, value in body.items() if name != "system"}
    payload = {
        "model": model,
        **payload,
        "messages": base.chat_messages(body),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)


def check(body: dict) -> str | None:
    """Nothing to refuse: the same format, every field forwarded."""
    return None
