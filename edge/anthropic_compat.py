"""The Anthropic-compatible API: `POST /v1/messages` (streamed or not), so the official
`anthropic` SDKs (and Claude Code) work by changing only their base URL.

Owns the translation between Anthropic's Messages shapes and sluice's normalized body and
events; everything else is the path every front end takes: `edge.authenticate` (the SDK's
`x-api-key` is read like a bearer key, edge/api_keys.py), `Edge.admit` (model routing and
aliases, the client key's limits, coalescing, pacing, the Pool, cancel, metrics), then
rendering: Anthropic's SSE events on the shared transport (`MessageRenderer` on
`SSEStream`), or one Message object (`Message`).

Requests (`parse_messages`): `model` and `max_tokens` are required, as Anthropic requires
them. `system` (a string or text blocks) becomes the first system message; `messages`
content is a string or blocks: text blocks are joined; an assistant's `tool_use` blocks
become OpenAI-style `tool_calls` on its message, a user's `tool_result` blocks become
`tool` messages (`tool_call_id`, the result's text) before that user's text, which is the
normalized body's shape for tools (protocols/providers/base.py); a user's `image` blocks
(base64 or url sources) become chat `image_url` parts (base64 as a data: URL) beside its
text; `thinking` / `redacted_thinking` blocks (a model's own reasoning sent back) are
dropped; any other block (document, search result, ...) is refused with 400 naming the
field. `stop_sequences` is `stop`; `temperature`, `top_p`, `top_k` are passed on; `tools`
({name, description, input_schema, strict}) become OpenAI function tools and
`tool_choice` its choice (`disable_parallel_tool_use: true` is `parallel_tool_calls:
false`; a request with tools is never coalesced). Fields with a chat counterpart are mapped
so they reach the provider (issue 14): `output_config.format` (structured output, the
SDK's `messages.parse`; also the deprecated beta `output_format`) is `response_format`
json_schema, `output_config.effort` is `reasoning_effort`, `metadata.user_id` is `user`.
`thinking`, `service_tier`, `cache_control` and the rest of Anthropic's fields are
accepted and ignored (Claude Code sends them on every call; refusing them would refuse
Claude Code). `anthropic-version` is not checked.

Streaming: `event: ping` when the connection opens and as keepalive; at the first
provider byte `message_start` (input tokens are reported in `message_delta`: they are
known only at the end); a text block (`content_block_start`, `text_delta`s,
`content_block_stop`) opened at the first text; each tool call as the provider streams it:
a `tool_use` block opened when the call starts (`content_block_start` with its id, name and
`input: {}`), an `input_json_delta` per argument fragment, closed when the next block opens
or the message ends (the adapters' meta(tool_call_delta), protocols/providers/base.py);
then `message_delta` (stop_reason, usage) and `message_stop`.
A failure after the 200 is `event: error` with `{"type": "error", "error": {"type",
"message"}}` and the stream ends without `message_stop`.

`POST /v1/messages/count_tokens` (the SDK's `messages.count_tokens`): forwarded to the
Anthropic upstream, through the Pool like any call (protocols/providers/anthropic_count_tokens.py),
when the model routes to an Anthropic account; the body goes up as the client sent it
(`model` mapped) and the answer comes back as the provider sent it. A model routed to any
other provider is a 400 `count_tokens_not_supported`: sluice has no other provider's
tokenizer, and a guess would mislead a client sizing its context (docs/providers.md
"Token counting").

Errors before streaming (and a non-streamed answer's failure) are Anthropic's shape with
sluice's status, except that a body of the wrong shape is a 400 (Anthropic's status for
`invalid_request_error`) rather than sluice's 422.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge import models
from edge.admission import Admission
from edge.chat_request import RequestError, check_number, parse_coalesce, parse_stream, parse_tools
from edge.openai_compat import RATE_LIMITED, STATUS_FOR_CODE, status_of_error
from edge.rejections import Rejection
from edge.sse_stream import Renderer, SSEStream
from protocols import events as ev
from protocols.providers.anthropic_count_tokens import BODY_FIELD as COUNT_FIELD
from protocols.providers.anthropic_count_tokens import COUNT_TOKENS_ADAPTERS

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
DROPPED_BLOCKS = ("thinking", "redacted_thinking")


# --- errors ---------------------------------------------------------------------------------


def error_type(status: int, code: str = "") -> str:
    if code in RATE_LIMITED:
        return "rate_limit_error"
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str, code: str = "") -> dict:
    return {"type": "error", "error": {"type": error_type(status, code), "message": message}}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    status = 400 if status == 422 else status
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def rejection_response(exc: Rejection) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers() or None)


def reshaped(denied: JSONResponse) -> JSONResponse:
    """`edge.authenticate`'s refusal (OpenAI's shape) in Anthropic's, same status and headers."""
    error = json.loads(bytes(denied.body)).get("error") or {}
    out = JSONResponse(
        error_body(denied.status_code, error.get("message", ""), error.get("code") or ""),
        status_code=denied.status_code,
    )
    for name in ("www-authenticate", "retry-after"):
        if name in denied.headers:
            out.headers[name] = denied.headers[name]
    return out


# --- requests -------------------------------------------------------------------------------


def _refuse(where: str, message: str) -> RequestError:
    return RequestError(400, "invalid_request", f"{where}: {message}")


def _text_of(blocks, where: str) -> str:
    """A string, or text blocks joined (a tool result's content, the system prompt)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _refuse(where, "must be a string or an array of content blocks")
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _refuse(f"{where}[{j}]", "only text blocks are supported here")
        texts.append(block["text"])
    return "".join(texts)


def _message(i: int, msg) -> list[dict]:
    """One Anthropic message as normalized messages (tool results come out as their own)."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise _refuse(where, "must be an object")
    role, content = msg.get("role"), msg.get("content")
    if role not in ("user", "assistant"):
        raise _refuse(f"{where}.role", "must be user or assistant")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _refuse(f"{where}.content", "must be a string or an array of content blocks")
    parts: list[dict] = []  # text and image_url parts, in order
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(block, dict):
            raise _refuse(at, "must be a content block (an object with a type)")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _refuse(f"{at}.text", "must be a string")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image_part(block, at))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _refuse(at, "a tool_use block needs a string id and name")
            if block.get("input") is not None and not isinstance(block["input"], dict):
                raise _refuse(f"{at}.input", "must be an object")
            arguments = json.dumps(block.get("input") or {}, separators=(",", ":"), ensure_ascii=False)
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _refuse(at, "a tool_result block needs a string tool_use_id")
            results.append(
                {
                    "role": "tool",
                    "tool_call_id": block["tool_use_id"],
                    "content": _text_of(block.get("content") or "", f"{at}.content"),
                }
            )
        elif kind in DROPPED_BLOCKS:
            continue
        else:
            raise _refuse(at, f"{kind or 'this'} blocks are not supported{' in ' + role + ' messages' if kind else ''}")
    out = list(results)
    if parts or calls or not results:
        images = any(part["type"] == "image_url" for part in parts)
        text = "".join(part["text"] for part in parts if part["type"] == "text")
        message: dict = {"role": role, "content": parts if images else text}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _image_part(block: dict, where: str) -> dict:
    """An image block as chat's `image_url` part: a base64 source as a data: URL (the
    Anthropic adapter turns it back into a base64 source), a url source as its URL."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    if kind == "url" and isinstance(source.get("url"), str) and source["url"]:
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _refuse(f"{where}.source", "must be {type: base64, media_type, data} or {type: url, url}")


def _tool(i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
        raise _refuse(where, "must be an object with a name")
    if tool.get("type") not in (None, "custom"):
        raise _refuse(f"{where}.type", f"server tools ({tool['type']!r}) are not supported")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise _refuse(f"{where}.input_schema", "must be a JSON schema object")
    function = {"name": tool["name"], "parameters": schema}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice):
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind in ("auto", "any", "none"):
        return {"auto": "auto", "any": "required", "none": "none"}[kind]
    raise _refuse("tool_choice", "must be {type: auto|any|none} or {type: tool, name}")


def parse_messages(data: dict, coalesce_header: str | None = None) -> tuple[str, dict, bool, bool]:
    """(model, normalized body, stream, coalesce) for an Anthropic Messages body; RequestError."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _refuse("model", "a non-empty string is required")
    max_tokens = data.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _refuse("max_tokens", "a positive integer is required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "must be a non-empty array")
    normalized: list[dict] = []
    system = data.get("system")
    if system is not None:
        text = _text_of(system, "system")
        if text:
            normalized.append({"role": "system", "content": text})
    for i, msg in enumerate(messages):
        normalized.extend(_message(i, msg))
    body: dict = {"messages": normalized, "max_tokens": max_tokens}
    check_number(data, "temperature", 1, _refuse)
    check_number(data, "top_p", 1, _refuse)
    for name in ("temperature", "top_p"):
        if data.get(name) is not None:
            body[name] = data[name]
    top_k = data.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise _refuse("top_k", "must be a positive integer")
        body["top_k"] = top_k
    stop = data.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _refuse("stop_sequences", "must be an array of strings")
        if stop:
            body["stop"] = stop
    body.update(parse_tools(data, _tool, _tool_choice, _refuse))
    body.update(_mapped_fields(data))
    stream = parse_stream(data, _refuse)
    coalesce = parse_coalesce(data, coalesce_header, _refuse)
    return model, body, stream, coalesce


def _mapped_fields(data: dict) -> dict:
    """The Anthropic fields with a chat counterpart, as chat fields: the tool choice's
    `disable_parallel_tool_use`, `metadata.user_id`, `output_config` (format, effort) and
    the deprecated beta `output_format`."""
    fields: dict = {}
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        fields["parallel_tool_calls"] = False
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _refuse("metadata", "must be an object")
        if metadata.get("user_id") is not None:
            if not isinstance(metadata["user_id"], str):
                raise _refuse("metadata.user_id", "must be a string")
            fields["user"] = metadata["user_id"]
    config = data.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise _refuse("output_config", "must be an object")
    config = config or {}
    for where, fmt in (("output_config.format", config.get("format")), ("output_format", data.get("output_format"))):
        if fmt is None:
            continue
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise _refuse(where, "must be {type: json_schema, schema}")
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if config.get("effort") is not None:
        fields["reasoning_effort"] = config["effort"]
    return fields


def parse_count_tokens(data: dict, coalesce_header: str | None = None) -> tuple[str, dict, bool]:
    """(model, normalized body, coalesce) for a count_tokens body; RequestError. The body is
    Anthropic's and goes to Anthropic: only its frame is checked here, the provider judges
    the rest (images, documents, thinking: whatever its counter takes)."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _refuse("model", "a non-empty string is required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "must be a non-empty array")
    coalesce = parse_coalesce(data, coalesce_header, _refuse)
    wanted = {k: v for k, v in data.items() if k not in ("model", "coalesce")}
    return model, {COUNT_FIELD: wanted}, coalesce


# --- responses ------------------------------------------------------------------------------


def stop_reason(reason: str | None) -> str:
    return STOP_REASONS.get(reason or "stop", reason or "end_turn")


def usage_of(usage: dict | None) -> dict:
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens") or 0, "output_tokens": usage.get("completion_tokens") or 0}


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(name: str, data: dict) -> bytes:
    return (
        f"event: {name}\ndata: ".encode()
        + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        + b"\n\n"
    )


PING = _event("ping", {"type": "ping"})


class MessageRenderer(Renderer):
    """sluice's stream events as Anthropic's Messages SSE events."""

    def __init__(self, admission: Admission, model: str):
        super().__init__(admission)
        self.model = model
        self.message_id = f"msg_{admission.request_id}"
        self.started_sent = False
        self.blocks = 0  # content blocks opened so far (the next one's index)
        self.open: str | None = None  # the kind of the block open now ("text", "tool_use"), if any
        self.tool_blocks: dict[int, int] = {}  # a streamed tool call's index -> its block's index
        self.usage: dict | None = None

    def opening(self) -> bytes:
        return PING

    def keepalive(self) -> bytes:
        return PING

    def started(self) -> bytes:
        if self.started_sent:
            return b""
        self.started_sent = True
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def event(self, event: dict) -> bytes:
        kind = event["type"]
        if kind == ev.DELTA:
            out = self.started()
            if self.open != "text":
                out += self._open_block("text", {"type": "text", "text": ""})
            return out + self._block_delta(self.blocks - 1, {"type": "text_delta", "text": event["delta"]})
        if kind == ev.META and isinstance(event.get("tool_call_delta"), dict) and not event.get("choice"):
            return self.started() + self._tool_call_delta(event["tool_call_delta"])
        if kind == ev.META and event.get("tool_calls") and not event.get("choice"):
            if self.tool_blocks:
                return b""  # the whole calls, already sent piece by piece
            out = self.started()
            for call in event["tool_calls"]:  # a stream whose calls came whole (no tool_call_delta)
                function = call.get("function") or {}
                out += self._open_block("tool_use", self._tool_block(call.get("id"), function.get("name")))
                delta = {"type": "input_json_delta", "partial_json": function.get("arguments") or "{}"}
                out += self._block_delta(self.blocks - 1, delta)
            return out
        if kind == ev.USAGE:
            self.usage = event["usage"]
        elif kind == ev.DONE:
            out = self.started() + self._close_block()
            delta = {"stop_reason": stop_reason(event.get("finish_reason")), "stop_sequence": None}
            out += _event(
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": usage_of(event.get("usage") or self.usage)},
            )
            return out + _event("message_stop", {"type": "message_stop"})
        elif kind == ev.ERROR:
            code = event.get("code", "error")
            return _event("error", error_body(STATUS_FOR_CODE.get(code, 500), event.get("message", ""), code))
        return b""  # other meta (citations, reasoning, ...) has no place in this format

    def _tool_call_delta(self, delta: dict) -> bytes:
        """A call's start opens its tool_use block; a fragment is an input_json_delta on it
        (by its block's index, as Anthropic's SDK accumulates them, should a provider
        interleave the fragments of parallel calls)."""
        index = delta.get("index", 0)
        out = b""
        if "id" in delta or index not in self.tool_blocks:
            out += self._open_block("tool_use", self._tool_block(delta.get("id"), delta.get("name")))
            self.tool_blocks[index] = self.blocks - 1
        if delta.get("arguments"):
            out += self._block_delta(
                self.tool_blocks[index], {"type": "input_json_delta", "partial_json": delta["arguments"]}
            )
        return out

    def _tool_block(self, call_id: str | None, name: str | None) -> dict:
        return {"type": "tool_use", "id": call_id or f"toolu_{self.blocks}", "name": name or "", "input": {}}

    def _open_block(self, kind: str, block: dict) -> bytes:
        out = self._close_block()
        self.open = kind
        self.blocks += 1
        return out + _event(
            "content_block_start", {"type": "content_block_start", "index": self.blocks - 1, "content_block": block}
        )

    def _block_delta(self, index: int, delta: dict) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def _close_block(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})


class Message:
    """One non-streamed Message, built from an admission's events."""

    def __init__(self, admission: Admission, model: str):
        self.admission, self.model = admission, model
        self.text: list[str] = []
        self.tool_calls: list[dict] = []
        self.usage: dict | None = None
        self.end: dict | None = None

    def add(self, event: dict) -> None:
        kind = event["type"]
        if kind == ev.DELTA:
            self.text.append(event["delta"])
        elif kind == ev.META and event.get("tool_calls"):
            self.tool_calls = event["tool_calls"]
        elif kind == ev.USAGE:
            self.usage = event["usage"]
        elif ev.is_terminal(event):
            self.end = event

    def response(self) -> JSONResponse:
        headers = {"x-request-id": self.admission.request_id}
        end = self.end or ev.error("disconnected", "the client went away")
        if end["type"] == ev.ERROR:
            code = end.get("code", "error")
            return error_response(status_of_error(end), code, end.get("message", ""), headers)
        content: list[dict] = [{"type": "text", "text": "".join(self.text)}] if self.text or not self.tool_calls else []
        for call in self.tool_calls:
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or f"toolu_{len(content)}",
                    "name": function.get("name", ""),
                    "input": _tool_input(function.get("arguments", "")),
                }
            )
        body = {
            "id": f"msg_{self.admission.request_id}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason(end.get("finish_reason")),
            "stop_sequence": None,
            "usage": usage_of(end.get("usage") or self.usage),
        }
        return JSONResponse(body, headers=headers)


# --- routes ---------------------------------------------------------------------------------


def routes(edge) -> list[Route]:
    async def messages(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return reshaped(denied)
        try:
            edge.check_in_service()  # before reading a body this edge will not serve
            data = await edge.json_body(request)
            model, body, stream, coalesce = parse_messages(data, request.headers.get("x-sluice-coalesce"))
            admission = await edge.admit(None, model, body, None, coalesce, request.state.key_id)
        except Rejection as exc:
            return rejection_response(exc)
        if stream:
            return SSEStream(admission, edge.settings.keepalive_s, MessageRenderer(admission, model))
        message = Message(admission, model)
        async with admission.serving(request.scope, request.receive):
            async for event in admission.events():
                message.add(event)
        return message.response()

    async def count_tokens(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return reshaped(denied)
        try:
            edge.check_in_service()
            data = await edge.json_body(request)
            model, body, coalesce = parse_count_tokens(data, request.headers.get("x-sluice-coalesce"))
            provider, _, adapter = models.route(model, edge.settings)
            if adapter not in COUNT_TOKENS_ADAPTERS:
                raise RequestError(
                    400,
                    "count_tokens_not_supported",
                    f"token counting is forwarded to Anthropic accounts only: model {model!r} goes to "
                    f"provider {provider!r}, whose tokenizer sluice does not have",
                )
            admission = await edge.admit(None, model, body, None, coalesce, request.state.key_id)
        except Rejection as exc:
            return rejection_response(exc)
        answer, end = None, None
        async with admission.serving(request.scope, request.receive):
            async for event in admission.events():
                if event["type"] == ev.META and isinstance(event.get(COUNT_FIELD), dict):
                    answer = event[COUNT_FIELD]
                elif ev.is_terminal(event):
                    end = event
        headers = {"x-request-id": admission.request_id}
        end = end or ev.error("disconnected", "the client went away")
        if end["type"] == ev.ERROR or answer is None:
            code = end.get("code", "upstream_malformed")
            status = status_of_error({**end, "code": code})
            return error_response(status, code, end.get("message", "the provider sent no count"), headers)
        return JSONResponse(answer, headers=headers)

    return [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
