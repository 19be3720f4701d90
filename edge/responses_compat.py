"""The OpenAI Responses API: `POST /v1/responses` (streamed or not), so the `openai` SDK's
`client.responses.create` works against sluice by changing only its base_url.

Owns the translation between the Responses shapes and sluice's normalized body and
events; the rest is every front end's path: `edge.authenticate`, `Edge.admit` (model
routing and aliases, key limits, coalescing, pacing, the Pool, cancel, metrics), then
rendering: the Responses SSE events on the shared transport (`ResponseRenderer` on
`SSEStream`), or one Response object (`Response`).

Requests (`parse_responses`): `input` is a string (one user message) or a list of items:
messages (`role` user / assistant / system / developer — developer is system — with a
string or `input_text` / `output_text` parts), `function_call` items (an assistant's
OpenAI-style `tool_calls`) and `function_call_output` items (`tool` messages), which is the
normalized body's shape for tools; `reasoning` items are dropped (an input of
nothing else is refused: no conversation is left to send); any other item or part
(images, files, ...) is refused with 422 naming it. `instructions` becomes the first
system message; `max_output_tokens` is `max_tokens`; `temperature`, `top_p` are passed
on; function `tools` ({type: function, name, description, parameters, strict}) become
chat tools and `tool_choice` its choice (never coalesced). `input_image` parts (a URL or a
data: URL) become chat `image_url` parts. Every other field with a chat counterpart is
mapped, so it reaches the provider (issue 14: nothing the client asked for is dropped
silently): `text.format` is `response_format` (json_object; json_schema's flat `name`,
`schema`, `description`, `strict` nested under `json_schema`; `text` is nothing),
`text.verbosity` is `verbosity`, `reasoning.effort` is `reasoning_effort`; `user`,
`metadata`, `parallel_tool_calls`, `service_tier`, `safety_identifier`,
`prompt_cache_key`, `prompt_cache_retention` keep their names (a value of a type
OpenAI does not take is a 422 naming it, as on chat). sluice stores no
responses: `store` is accepted and ignored (answers are never retrievable), and what
needs stored state (`previous_response_id`, `conversation`, `prompt`, `background`) is
refused (422). Accepted and ignored, as they ask nothing of the model: `include`,
`truncation`, `stream_options`, `reasoning.summary`. Any other field is a 400
`unsupported_parameter` naming it (as OpenAI answers an unknown parameter).

Streaming: `response.created` and `response.in_progress` as soon as the call is admitted
(SSE comments `: ping` as keepalive), at the first text `response.output_item.added` and
`response.content_part.added`, then `response.output_text.delta`s; at the end
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`;
each tool call as the provider streams it, as a `function_call` item: `output_item.added`
when the call starts, a `response.function_call_arguments.delta` per argument fragment,
then `response.function_call_arguments.done` and `output_item.done` (items in the order
they streamed: a message closes when a call starts; the adapters' meta(tool_call_delta),
protocols/providers/base.py); then `response.completed` (or `response.incomplete` when the
answer hit its token limit). Every event carries `sequence_number`. A failure after the 200 is one
`response.failed` event whose response holds `error` {code, message}; no `[DONE]` (the
Responses API sends none).

Errors before streaming, and a non-streamed answer's failure, are OpenAI's shape with
sluice's status and code (edge/openai_compat.py).
"""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.admission import Admission
from edge.chat_request import RequestError, check_number, parse_coalesce, parse_stream, parse_tools
from edge.openai_compat import error_response, rejection_response, status_of_error
from edge.rejections import Rejection
from edge.sse_stream import Renderer, SSEStream
from protocols import events as ev

KEEPALIVE = b": ping\n\n"
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")
IGNORED_ITEMS = ("reasoning",)
# Top-level fields with a chat counterpart of the same name and meaning: passed on as sent.
SAME_NAME = (
    "user",
    "metadata",
    "parallel_tool_calls",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
)
# Of those, the ones OpenAI's API takes as strings only (a value of another type is refused
# here, as chat's OPENAI_TYPES refuses it, rather than sent upstream as it came).
STRING_FIELDS = ("user", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention")
# Fields read or mapped by parse_responses (sluice's own `coalesce` included).
MAPPED = (
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "text",
    "reasoning",
    "stream",
    "coalesce",
    "store",
    "previous_response_id",
)
# Accepted and ignored: they shape what comes back around the answer, not the answer.
IGNORED_FIELDS = ("include", "truncation", "stream_options")
# Need state sluice does not keep: refused unless null (or false).
STATEFUL = ("previous_response_id", "conversation", "prompt", "background")


def _refuse(where: str, message: str) -> RequestError:
    return RequestError(422, "invalid_request", f"{where}: {message}")


# --- requests -------------------------------------------------------------------------------


def _image_part(part: dict, where: str) -> dict:
    """An `input_image` part as chat's `image_url` part (a file_id names a stored file: refused)."""
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise _refuse(where, "an input_image part needs an image_url (a URL or a data: URL); file_id is not supported")
    image: dict = {"url": url}
    if part.get("detail") is not None:
        if part["detail"] not in ("auto", "low", "high"):
            raise _refuse(f"{where}.detail", "must be auto, low or high")
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _content(content, where: str, images: bool = False) -> str | list[dict]:
    """A message's content: its text, or (when it has images and `images` allows them)
    chat's content parts, text and `image_url`, in order."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(where, "must be a string or an array of content parts")
    parts: list[dict] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _refuse(f"{where}[{j}]", "must be a content part (an object with a type)")
        kind = part.get("type")
        if kind == "input_image" and images:
            parts.append(_image_part(part, f"{where}[{j}]"))
        elif kind in TEXT_PARTS and not isinstance(part.get("text"), str):
            raise _refuse(f"{where}[{j}].text", "must be a string")
        elif kind not in TEXT_PARTS:
            allowed = "text and input_image" if images else "text only"
            raise _refuse(f"{where}[{j}]", f"{kind or 'this'} parts are not supported ({allowed})")
        else:
            parts.append({"type": "text", "text": part["text"]})
    if any(p["type"] == "image_url" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _items(value) -> list[dict]:
    """The normalized messages of `input` (consecutive function calls share one assistant turn)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _refuse("input", "must be a string or a non-empty array of items")
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _refuse(where, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            role = ROLES.get(role) if isinstance(role, str) else None  # a list or object: not a key
            if role is None:
                raise _refuse(f"{where}.role", "must be user, assistant, system or developer")
            content = _content(item.get("content"), f"{where}.content", images=role == "user")
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise _refuse(where, "a function_call needs string call_id, name and arguments")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise _refuse(where, "a function_call_output needs a string call_id and output")
            out.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _content(output, f"{where}.output")}
            )
        elif kind in IGNORED_ITEMS:
            continue
        else:
            raise _refuse(f"{where}.type", f"{kind!r} items are not supported")
    if not out:  # reasoning items only: no conversation to send (chat refuses empty messages)
        raise _refuse("input", "must hold a message or function call item (reasoning items are not sent)")
    return out


def _tool(i: int, tool) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _refuse(where, f"only function tools are supported{f', not {kind!r}' if kind else ''}")
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise _refuse(f"{where}.name", "must be a non-empty string")
    function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        if not isinstance(tool["strict"], bool):
            raise _refuse(f"{where}.strict", "must be true or false")
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice):
    if choice in ("auto", "required", "none"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _refuse("tool_choice", "must be auto, required, none or {type: function, name}")


def parse_responses(data: dict, coalesce_header: str | None = None) -> tuple[str | None, dict, bool, bool, dict]:
    """(model, normalized body, stream, coalesce, echo) for a Responses body; RequestError.
    `echo`: the request's settings the Response object repeats back."""
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _refuse("model", "must be a non-empty string")
    _check_fields(data)
    messages = _items(data.get("input"))
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _refuse("instructions", "must be a string")
        if instructions:
            messages.insert(0, {"role": "system", "content": instructions})
    body: dict = {"messages": messages}
    max_tokens = data.get("max_output_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _refuse("max_output_tokens", "must be a positive integer")
        body["max_tokens"] = max_tokens
    check_number(data, "temperature", 2, _refuse)
    check_number(data, "top_p", 1, _refuse)
    for name in ("temperature", "top_p"):
        if data.get(name) is not None:
            body[name] = data[name]
    body.update(parse_tools(data, _tool, _tool_choice, _refuse))
    body.update(_text_fields(data.get("text")))
    body.update(_reasoning_fields(data.get("reasoning")))
    body.update(_same_name_fields(data))
    stream = parse_stream(data, _refuse)
    coalesce = parse_coalesce(data, coalesce_header, _refuse)
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_tokens,
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "tools": data.get("tools") or [],
        "tool_choice": data.get("tool_choice") or "auto",
        "metadata": data.get("metadata") if isinstance(data.get("metadata"), dict) else {},
        "text": data.get("text") or {"format": {"type": "text"}},
        "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
        "user": data.get("user"),
    }
    return model, body, stream, coalesce, echo


def _check_fields(data: dict) -> None:
    """Refuse what sluice cannot honour: stored state, and any field it does not know (a
    field passed over in silence would change the answer without the client knowing)."""
    for name in STATEFUL:
        if data.get(name) not in (None, False):
            raise _refuse(name, "sluice stores no responses: send the whole conversation as input")
    if data.get("top_logprobs") not in (None, 0):
        raise RequestError(400, "unsupported_parameter", "'top_logprobs' is not supported on /v1/responses")
    known = (*MAPPED, *SAME_NAME, *IGNORED_FIELDS, *STATEFUL, "top_logprobs")
    for name in data:
        if name not in known:
            raise RequestError(
                400,
                "unsupported_parameter",
                f"'{name}' is not supported on /v1/responses (docs/providers.md, \"Responses\")",
            )


def _text_fields(text) -> dict:
    """`text` ({format, verbosity}) as chat's `response_format` and `verbosity`."""
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise _refuse("text", "must be an object ({format, verbosity})")
    fields: dict = {}
    unknown = [k for k in text if k not in ("format", "verbosity")]
    if unknown:
        raise RequestError(400, "unsupported_parameter", f"'text.{unknown[0]}' is not supported on /v1/responses")
    if text.get("verbosity") is not None:
        if not isinstance(text["verbosity"], str):
            raise _refuse("text.verbosity", "must be a string (low, medium or high)")
        fields["verbosity"] = text["verbosity"]
    fmt = text.get("format")
    if fmt is None:
        return fields
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _refuse("text.format", "a json_schema format needs a string name and a schema object")
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind != "text":
        raise _refuse("text.format.type", "must be text, json_object or json_schema")
    return fields


def _reasoning_fields(reasoning) -> dict:
    """`reasoning.effort` as chat's `reasoning_effort` (`summary` asks for summary items,
    which this front end does not produce: ignored)."""
    if reasoning is None:
        return {}
    if not isinstance(reasoning, dict):
        raise _refuse("reasoning", "must be an object ({effort, summary})")
    effort = reasoning.get("effort")
    if effort is not None and not isinstance(effort, str):
        raise _refuse("reasoning.effort", "must be a string (minimal, low, medium or high)")
    return {"reasoning_effort": effort} if effort is not None else {}


def _same_name_fields(data: dict) -> dict:
    if data.get("metadata") is not None and not isinstance(data["metadata"], dict):
        raise _refuse("metadata", "must be an object")
    if data.get("parallel_tool_calls") is not None and not isinstance(data["parallel_tool_calls"], bool):
        raise _refuse("parallel_tool_calls", "must be true or false")
    for name in STRING_FIELDS:
        if data.get(name) is not None and not isinstance(data[name], str):
            raise _refuse(name, "must be a string")
    return {name: data[name] for name in SAME_NAME if data.get(name) is not None}


# --- responses ------------------------------------------------------------------------------


def usage_of(usage: dict | None) -> dict:
    usage = usage or {}
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def _usage_or_none(usage: dict | None) -> dict | None:
    """Usage only when the provider sent it: left out (null), never reported as zeros."""
    return usage_of(usage) if usage else None


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_item(call: dict, n: int) -> dict:
    function = call.get("function") or {}
    call_id = call.get("id") or f"call_{n}"
    return {
        "type": "function_call",
        "id": f"fc_{call_id}",
        "call_id": call_id,
        "name": function.get("name", ""),
        "arguments": function.get("arguments") or "{}",
        "status": "completed",
    }


class _Shape:
    """The Response object as it grows: the same for both renderings."""

    def __init__(self, admission: Admission, model: str, created: int, echo: dict):
        self.id = f"resp_{admission.request_id}"
        self.message_id = f"msg_{admission.request_id}"
        self.model, self.created, self.echo = model, created, echo
        self.text: list[str] = []
        self.tool_calls: list[dict] = []
        self.usage: dict | None = None

    def message_item(self, status: str) -> dict:
        content = [_text_part("".join(self.text))] if status == "completed" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def output(self) -> list[dict]:
        out = [self.message_item("completed")] if self.text or not self.tool_calls else []
        return out + [_function_item(call, n) for n, call in enumerate(self.tool_calls)]

    def response(self, status: str, end: dict | None = None, output: list[dict] | None = None) -> dict:
        """The Response object: "in_progress" (no output yet), "completed", "incomplete", "failed";
        `output`: the items as they streamed (else built from the text and the tool calls)."""
        finished = status in ("completed", "incomplete")
        error = None
        if status == "failed" and end is not None:
            error = {"code": end.get("code", "error"), "message": end.get("message", "")}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": (self.output() if output is None else output) if finished else [],
            "usage": _usage_or_none((end or {}).get("usage") or self.usage) if finished else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}},
            "store": False,
            **self.echo,
        }


def _ending(end: dict) -> str:
    return "incomplete" if end.get("finish_reason") == "length" else "completed"


class ResponseRenderer(Renderer):
    """sluice's stream events as the Responses API's SSE events. Output items are numbered
    in the order they open: a message at its first text, a function_call when its call
    starts streaming; opening one closes the one before."""

    def __init__(self, admission: Admission, model: str, created: int, echo: dict):
        super().__init__(admission)
        self.shape = _Shape(admission, model, created, echo)
        self.sequence = 0
        self.items: list[dict] = []  # the output items so far, in order (the open one last)
        self.open: dict | None = None  # the item being streamed: a message or a function_call
        self.texts: dict[str, list[str]] = {}  # a message item's id -> its text pieces
        self.calls: dict[int, dict] = {}  # a streamed call's index -> its function_call item

    def opening(self) -> bytes:
        return self._event("response.created", response=self.shape.response("in_progress")) + self._event(
            "response.in_progress", response=self.shape.response("in_progress")
        )

    def keepalive(self) -> bytes:
        return KEEPALIVE

    def event(self, event: dict) -> bytes:
        kind = event["type"]
        shape = self.shape
        if kind == ev.DELTA:
            out = self._open_message()
            message = self.open or {}
            shape.text.append(event["delta"])
            self.texts[message["id"]].append(event["delta"])
            return out + self._event(
                "response.output_text.delta",
                item_id=message["id"],
                output_index=self._index(message),
                content_index=0,
                delta=event["delta"],
                logprobs=[],
            )
        if kind == ev.META and isinstance(event.get("tool_call_delta"), dict) and not event.get("choice"):
            return self._tool_call_delta(event["tool_call_delta"])
        if kind == ev.META and event.get("tool_calls") and not event.get("choice"):
            shape.tool_calls = event["tool_calls"]
        elif kind == ev.USAGE:
            shape.usage = event["usage"]
        elif kind == ev.DONE:
            out = self._close()
            if not self.calls:  # calls that came whole (none streamed): one item each, now
                for n, call in enumerate(shape.tool_calls):
                    item = {**_function_item(call, n), "status": "in_progress"}
                    out += self._start(item) + self._close()
            if not self.items:  # an empty answer is still one (empty) message
                out += self._open_message() + self._close()
            status = _ending(event)
            return out + self._event(f"response.{status}", response=shape.response(status, event, self.items))
        elif kind == ev.ERROR:
            return self._event("response.failed", response=shape.response("failed", event))
        return b""  # other meta (citations, reasoning, ...) has no place in this format

    def _tool_call_delta(self, delta: dict) -> bytes:
        index = delta.get("index", 0)
        out = b""
        if "id" in delta or index not in self.calls:
            call_id = delta.get("id") or f"call_{index}"
            item = {
                "type": "function_call",
                "id": f"fc_{call_id}",
                "call_id": call_id,
                "name": delta.get("name") or "",
                "arguments": "",
                "status": "in_progress",
            }
            self.calls[index] = item
            out += self._start(item)
        item = self.calls[index]
        if delta.get("arguments"):
            item["arguments"] += delta["arguments"]
            out += self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=self._index(item),
                delta=delta["arguments"],
            )
        return out

    def _index(self, item: dict) -> int:
        return next(i for i, known in enumerate(self.items) if known is item)

    def _start(self, item: dict) -> bytes:
        out = self._close()
        self.items.append(item)
        self.open = item
        return out + self._event("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _open_message(self) -> bytes:
        if self.open is not None and self.open["type"] == "message":
            return b""
        first = not self.texts
        message_id = self.shape.message_id if first else f"{self.shape.message_id}_{len(self.items)}"
        self.texts[message_id] = []
        item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
        return self._start(item) + self._event(
            "response.content_part.added",
            item_id=message_id,
            output_index=len(self.items) - 1,
            content_index=0,
            part=_text_part(""),
        )

    def _close(self) -> bytes:
        """Finish the open item, if any: its done events, and it becomes completed."""
        item, self.open = self.open, None
        if item is None:
            return b""
        index = self._index(item)
        item["status"] = "completed"
        if item["type"] == "function_call":
            item["arguments"] = item["arguments"] or "{}"
            return self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            ) + self._event("response.output_item.done", output_index=index, item=item)
        text = "".join(self.texts[item["id"]])
        item["content"] = [_text_part(text)]
        return (
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            + self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(text),
            )
            + self._event("response.output_item.done", output_index=index, item=item)
        )

    def _event(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return (
            f"event: {kind}\ndata: ".encode()
            + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            + b"\n\n"
        )


class Response:
    """One non-streamed Response object, built from an admission's events."""

    def __init__(self, admission: Admission, model: str, created: int, echo: dict):
        self.admission = admission
        self.shape = _Shape(admission, model, created, echo)
        self.end: dict | None = None

    def add(self, event: dict) -> None:
        kind = event["type"]
        if kind == ev.DELTA:
            self.shape.text.append(event["delta"])
        elif kind == ev.META and event.get("tool_calls"):
            self.shape.tool_calls = event["tool_calls"]
        elif kind == ev.USAGE:
            self.shape.usage = event["usage"]
        elif ev.is_terminal(event):
            self.end = event

    def response(self) -> JSONResponse:
        headers = {"x-request-id": self.admission.request_id}
        end = self.end or ev.error("disconnected", "the client went away")
        if end["type"] == ev.ERROR:
            return error_response(status_of_error(end), end.get("code", "error"), end.get("message", ""), headers)
        return JSONResponse(self.shape.response(_ending(end), end), headers=headers)


# --- routes ---------------------------------------------------------------------------------


def routes(edge) -> list[Route]:
    async def responses(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return denied
        created = int(time.time())
        try:
            edge.check_in_service()  # before reading a body this edge will not serve
            data = await edge.json_body(request)
            model, body, stream, coalesce, echo = parse_responses(data, request.headers.get("x-sluice-coalesce"))
            admission = await edge.admit(None, model, body, None, coalesce, request.state.key_id)
        except Rejection as exc:
            return rejection_response(exc)
        shown = model or f"{admission.provider}/{admission.model}"
        if stream:
            renderer = ResponseRenderer(admission, shown, created, echo)
            return SSEStream(admission, edge.settings.keepalive_s, renderer)
        answer = Response(admission, shown, created, echo)
        async with admission.serving(request.scope, request.receive):
            async for event in admission.events():
                answer.add(event)
        return answer.response()

    return [Route("/v1/responses", responses, methods=["POST"])]
