"""The OpenAI-compatible chat API: `POST /v1/chat/completions` (streamed or not), so the
official `openai` SDKs work by changing only their base_url (`/v1/models` is edge/models.py).

Owns the translation between OpenAI's request/response shapes and sluice's; everything
else is the same path as /api/chat: the body is read and validated by the same helpers
(edge/chat_request.py), the call is admitted by `Edge.admit` (Coalescer, Pacer, Pool, hub,
cancellation), and its Admission's events are rendered here: as chunks on the SSE
transport (`ChunkRenderer`), or collected into one chat.completion (`Completion`).

Decisions (an OpenAI client must not notice it is talking to a gateway):

- `model` picks the provider: "provider/model" when the first segment is a sluice provider
  name ("anthropic/claude-sonnet-4-5", "perplexity/openai/gpt-5"); a bare provider name
  means its configured model; anything else is a model of the default provider
  (SLUICE_PROVIDER). `GET /v1/models` lists every configured provider's default model as
  "provider/model". Without a provider prefix, a sluice "provider" field in the body
  (`extra_body` in the SDK) is honoured.
- The body goes upstream as the client sent it (edge/chat_request.py, docs/providers.md
  "Fidelity"): every field but those sluice owns (`model` mapped, `stream`,
  `stream_options`); message shapes (developer, content parts and images, tool_calls with
  `content: null`, role tool with tool_call_id, name) kept. A provider of another format
  maps what has a counterpart and refuses the rest with a 400 `unsupported_parameter`
  naming the field (its adapter's `check`, called by `Edge.admit`).
- The answer in OpenAI's shape, streamed and not: content, refusal, reasoning (as
  `reasoning_content`), tool calls with their ids, logprobs, `system_fingerprint`,
  Perplexity's top-level `citations`/`search_results`, every choice of an `n > 1` request
  (a same-format provider answers them; others refuse n > 1). Usage only when the provider
  sent some: never made-up zeros.
- Streaming: `: ping` SSE comments when the connection opens and as keepalive (OpenAI's
  SDKs skip comments), no sluice meta/ping events. At the first provider byte a chunk with
  delta.role; then delta.content chunks; tool calls as the provider streams them, as OpenAI
  sends them: a chunk opening each call (`tool_calls[{index, id, type, function: {name,
  arguments: ""}}]`), then a chunk per argument fragment (`tool_calls[{index, function:
  {arguments}}]`) (the adapters' meta(tool_call_delta), protocols/providers/base.py); the last
  chunk has finish_reason; with stream_options.include_usage every chunk has "usage": null
  and a final chunk with empty choices carries the usage (when the provider reported any);
  then `data: [DONE]`.
- A failure after the 200 is sent is one `data: {"error": {...}}` frame, as OpenAI does
  (its SDK raises APIError on it), and the stream then ends WITHOUT `data: [DONE]`:
  [DONE] means "the answer is complete", and a client that only looks for [DONE] must see
  a truncated stream rather than a short answer that looks whole.
- Non-streaming requests consume the same events server-side and answer one
  chat.completion; a failure becomes an HTTP error (429 for rate limits, 400/404 for a
  request the provider refused, 504 for a provider timeout, 503 while shutting down,
  otherwise 502). If the client disconnects meanwhile, the stream is cancelled exactly as
  for a streaming client (`Admission.serving` sees `http.disconnect` on the same channel).
- Errors before streaming keep sluice's HTTP status (400 malformed JSON, 413, 415, 422,
  429 with Retry-After from the Pacer, 503) in OpenAI's shape
  `{"error": {"message", "type", "param", "code"}}`, code being sluice's error code.
- With client API keys (edge/api_keys.py) every route here needs one: 401 invalid_api_key,
  403 model_not_allowed, 429 rate_limit_exceeded, in the same shape; `GET /v1/models`
  lists only the models the caller's key may use.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.admission import Admission
from edge.chat_request import RequestError, parse_chat, parse_stream, refuse_field
from edge.rejections import Rejection
from edge.sse_stream import Renderer, SSEStream
from protocols import events as ev
from protocols.config import PROVIDERS
from protocols.sse import frame

KEEPALIVE = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
RATE_LIMITED = ("upstream_429", "pacer_queue_full", "pacer_queue_timeout")
# HTTP status of a non-streamed answer whose stream ended in error (default 502).
STATUS_FOR_CODE = {
    **dict.fromkeys(RATE_LIMITED, 429),
    "upstream_timeout": 504,
    "shutting_down": 503,
    "gateway_unavailable": 503,
    "cancelled": 499,  # the client went away or cancelled; nobody reads this answer
    "disconnected": 499,
}


# --- errors ---------------------------------------------------------------------------------


def status_of_error(end: dict) -> int:
    """The HTTP status of a non-streamed answer whose stream ended in the error event `end`."""
    code = end.get("code", "error")
    if code == "upstream_4xx":  # the provider refused the request itself: say how
        return end.get("status") if end.get("status") in (400, 404, 413, 422) else 400
    return STATUS_FOR_CODE.get(code, 502)


def error_type(status: int, code: str) -> str:
    if status == 429 or code in RATE_LIMITED:
        return "rate_limit_error"
    if 400 <= status < 500 or code == "upstream_4xx":
        return "invalid_request_error"
    return "server_error"


def error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"message": message, "type": error_type(status, code), "param": None, "code": code}}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


def rejection_response(exc: Rejection) -> JSONResponse:
    """A refusal before streaming, in OpenAI's shape (sluice's status, code and Retry-After)."""
    return error_response(exc.status, exc.code, exc.message, exc.headers() or None)


# --- requests -------------------------------------------------------------------------------


def parse_openai(data: dict, coalesce_header: str | None):
    """(ChatRequest, stream, include_usage) for an OpenAI chat.completions body; RequestError.
    The body is taken as it came (edge/chat_request.py): nothing is rewritten here."""
    stream = parse_stream(data, refuse_field)
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(422, "invalid_request", "'stream_options' must be an object")
    if options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):
        raise RequestError(422, "invalid_request", "'stream_options.include_usage' must be true or false")
    chat = parse_chat(data, coalesce_header)
    return chat, stream, bool(options.get("include_usage"))


def resolve_model(model: str | None, provider: str | None) -> tuple[str | None, str | None]:
    """(provider, model) for an OpenAI `model` string; None means the configured default."""
    if model:
        head, _, rest = model.partition("/")
        if head in PROVIDERS:
            return head, rest or None
    return provider, model


# --- responses ------------------------------------------------------------------------------


def _usage(usage: dict) -> dict:
    return {k: usage.get(k) or 0 for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _finish_reason(reason: str | None) -> str:
    return reason if reason in FINISH_REASONS else "stop"


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"index": i, **call} for i, call in enumerate(calls)]


def _tool_call_delta(delta: dict) -> dict:
    """A meta(tool_call_delta) as OpenAI streams a tool call: the opening chunk names it,
    the later ones carry argument fragments only."""
    if "id" in delta:
        function = {"name": delta.get("name") or "", "arguments": ""}
        return {"index": delta["index"], "id": delta["id"], "type": "function", "function": function}
    return {"index": delta["index"], "function": {"arguments": delta.get("arguments", "")}}


class Extras:
    """What a stream tells about the whole answer, kept for the chunks and the body:
    system_fingerprint, citations and search_results (Perplexity's top-level fields),
    the finish reasons of choices beyond 0, and usage."""

    def __init__(self) -> None:
        self.top: dict = {}  # top-level fields of every chunk from now on / of the body
        self.finishes: dict[int, str] = {}
        self.usage: dict | None = None

    def take(self, event: dict) -> bool:
        """True when `event` was one of these (nothing else to render for it)."""
        kind = event["type"]
        if kind == ev.USAGE:
            self.usage = event["usage"]
            return True
        if kind != ev.META:
            return False
        taken = False
        if isinstance(event.get("system_fingerprint"), str):
            self.top["system_fingerprint"] = event["system_fingerprint"]
            taken = True
        for name in ("citations", "search_results"):
            if isinstance(event.get(name), list):
                # Sonar repeats the whole list, Anthropic sends one at a time: keep the union, in order.
                known = self.top.setdefault(name, [])
                known.extend(item for item in event[name] if item not in known)
                taken = True
        if isinstance(event.get("finish_reason"), str) and event.get("choice"):
            self.finishes[event["choice"]] = event["finish_reason"]
            taken = True
        return taken


def _delta_of(event: dict) -> dict | None:
    """The OpenAI delta for a content event (text, refusal, reasoning, tool calls), or None."""
    kind = event["type"]
    if kind == ev.DELTA:
        return {"content": event["delta"]}
    if kind != ev.META:
        return None
    if event.get("tool_calls"):
        return {"tool_calls": _tool_calls(event["tool_calls"])}
    if isinstance(event.get("refusal"), str):
        return {"refusal": event["refusal"]}
    if isinstance(event.get("reasoning"), str):
        return {"reasoning_content": event["reasoning"]}  # as DeepSeek, vLLM and OpenRouter send it
    return None


class ChunkRenderer(Renderer):
    """sluice's stream events as OpenAI chat.completion.chunk frames."""

    def __init__(self, admission: Admission, model: str, created: int, include_usage: bool):
        super().__init__(admission)
        self.base = {
            "id": f"chatcmpl-{admission.request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage
        self.roles_sent: set[int] = set()
        self.tools_streamed: set[int] = set()  # choices whose tool calls went out as they streamed
        self.extras = Extras()

    def opening(self) -> bytes:
        return KEEPALIVE

    def keepalive(self) -> bytes:
        return KEEPALIVE

    def started(self) -> bytes:
        return self._role(0)

    def event(self, event: dict) -> bytes:
        kind = event["type"]
        if self.extras.take(event):
            return b""
        index = event.get("choice") or 0
        if kind == ev.META and isinstance(event.get("tool_call_delta"), dict):
            self.tools_streamed.add(index)
            call = _tool_call_delta(event["tool_call_delta"])
            return self._role(index) + self._chunk(index, {"tool_calls": [call]})
        if kind == ev.META and event.get("tool_calls") and index in self.tools_streamed:
            return b""  # the whole calls, already sent piece by piece
        delta = _delta_of(event)
        if delta is not None:
            return self._role(index) + self._chunk(index, delta, logprobs=event.get("logprobs"))
        if kind == ev.DONE:
            out = self._role(0)
            for i in sorted(self.roles_sent):
                reason = event.get("finish_reason") if i == 0 else self.extras.finishes.get(i)
                out += self._chunk(i, {}, _finish_reason(reason))
            usage = event.get("usage") or self.extras.usage
            if self.include_usage and usage:  # none sent by the provider: none reported, never zeros
                out += frame({**self.base, **self.extras.top, "choices": [], "usage": _usage(usage)})
            return out + DONE
        if kind == ev.ERROR:
            return frame(error_body(500, event.get("code", "error"), event.get("message", "")))
        return b""  # other meta (search queries, ...) has no place in this format

    def _role(self, index: int) -> bytes:
        if index in self.roles_sent:
            return b""
        self.roles_sent.add(index)
        return self._chunk(index, {"role": "assistant", "content": ""})

    def _chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        obj = {
            **self.base,
            **self.extras.top,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self.include_usage:
            obj["usage"] = None  # as OpenAI sends it on every chunk but the last
        return frame(obj)


class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] | None = None
        self.logprobs: dict | None = None

    def add(self, event: dict) -> None:
        if event["type"] == ev.DELTA:
            self.text.append(event["delta"])
            for name, items in (event.get("logprobs") or {}).items():
                if isinstance(items, list):
                    self.logprobs = self.logprobs or {"content": None, "refusal": None}
                    self.logprobs[name] = (self.logprobs.get(name) or []) + items
        elif event.get("tool_calls"):
            self.tool_calls = event["tool_calls"]
        elif isinstance(event.get("refusal"), str):
            self.refusal.append(event["refusal"])
        elif isinstance(event.get("reasoning"), str):
            self.reasoning.append(event["reasoning"])

    def message(self) -> dict:
        content = "".join(self.text)
        message: dict = {
            "role": "assistant",
            "content": content if content or not self.tool_calls else None,
            "refusal": "".join(self.refusal) or None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class Completion:
    """One non-streamed chat.completion, built from an admission's events."""

    def __init__(self, admission: Admission, model: str, created: int):
        self.admission, self.model, self.created = admission, model, created
        self.choices: dict[int, _Choice] = {0: _Choice()}
        self.extras = Extras()
        self.end: dict | None = None

    def add(self, event: dict) -> None:
        kind = event["type"]
        if self.extras.take(event):
            return
        if kind in (ev.DONE, ev.ERROR):
            self.end = event
        elif kind in (ev.DELTA, ev.META):
            self.choices.setdefault(event.get("choice") or 0, _Choice()).add(event)

    def response(self) -> JSONResponse:
        headers = {"x-request-id": self.admission.request_id}
        end = self.end or ev.error("disconnected", "the client went away")
        if end["type"] == ev.ERROR:
            return error_response(status_of_error(end), end.get("code", "error"), end.get("message", ""), headers)
        choices = []
        for i, choice in sorted(self.choices.items()):
            reason = end.get("finish_reason") if i == 0 else self.extras.finishes.get(i)
            choices.append(
                {
                    "index": i,
                    "message": choice.message(),
                    "logprobs": choice.logprobs,
                    "finish_reason": _finish_reason(reason),
                }
            )
        body = {
            "id": f"chatcmpl-{self.admission.request_id}",
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            **self.extras.top,
            "choices": choices,
        }
        usage = end.get("usage") or self.extras.usage
        if usage:  # none sent by the provider: none reported, never zeros
            body["usage"] = _usage(usage)
        return JSONResponse(body, headers=headers)


# --- routes ---------------------------------------------------------------------------------


def routes(edge) -> list[Route]:
    async def chat_completions(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return denied  # already in OpenAI's shape (invalid_api_key)
        created = int(time.time())
        try:
            edge.check_in_service()  # before reading a body this edge will not serve
            data = await edge.json_body(request)
            chat, stream, include_usage = parse_openai(data, request.headers.get("x-sluice-coalesce"))
            provider, model = resolve_model(chat.model, chat.provider)
            admission = await edge.admit(
                provider, model, chat.body, chat.thread_id, chat.coalesce, request.state.key_id
            )
        except Rejection as exc:
            return rejection_response(exc)
        shown = chat.model or f"{admission.provider}/{admission.model}"
        if stream:
            renderer = ChunkRenderer(admission, shown, created, include_usage)
            return SSEStream(admission, edge.settings.keepalive_s, renderer)
        completion = Completion(admission, shown, created)
        # The events are consumed here; request.receive still reports the client's disconnect.
        async with admission.serving(request.scope, request.receive):
            async for event in admission.events():
                completion.add(event)
        return completion.response()

    return [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
