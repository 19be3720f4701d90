"""`POST /v1/embeddings`: OpenAI's embeddings API, through the same path as chat.

Owns the translation between OpenAI's embeddings request/response and sluice's normalized
body `{"embeddings": {"input", "encoding_format"?, "dimensions"?, "user"?}}`. The call is
admitted by `Edge.admit` like any chat request: paced, coalesced (identical embedding
requests in flight share one upstream call: the `embeddings` object is part of the
coalescing key, protocols/keys.py), cancelled when the client leaves, measured. The Pool
runs it with the embeddings adapter (protocols/providers/openai_embeddings.py), whose
"stream" is the provider's one JSON answer; its events (`meta(embeddings)`, `usage`, the
terminal) are collected here into OpenAI's `list` object.

Decisions:
- `model` is required (as OpenAI requires it) and routes like chat's (edge/models.py);
  the provider it resolves to must have an OpenAI-style embeddings API (OpenAI, Ollama,
  the simulated provider): otherwise 400 `embeddings_not_supported`.
- `input`: a non-empty string, a list of strings, a token list or a list of token lists,
  at most MAX_INPUTS items; `encoding_format` float or base64 (the SDK asks for base64 and
  decodes it itself: passed through as the provider sent it); `dimensions` a positive integer.
  Any other field (a server's own, e.g. Ollama's `truncate`) goes upstream as it came, in
  the `embeddings` object (so in the coalescing key too).
- Errors in OpenAI's shape with sluice's status and code, as /v1/chat/completions.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge import models
from edge.chat_request import RequestError, parse_coalesce, refuse_field
from edge.openai_compat import error_response, rejection_response, status_of_error
from edge.rejections import Rejection
from protocols import events as ev
from protocols.providers.openai_embeddings import BODY_FIELD, EMBEDDING_ADAPTERS

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request
ENCODINGS = ("float", "base64")
OWNED_FIELDS = ("model", "coalesce", "provider")


def _is_tokens(value) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _check_input(value) -> None:
    if isinstance(value, str):
        if not value:
            raise RequestError(422, "invalid_request", "'input' must not be empty")
        return
    if _is_tokens(value):
        return
    if not isinstance(value, list) or not value:
        raise RequestError(422, "invalid_request", "'input' must be a string, an array of strings or of token arrays")
    if len(value) > MAX_INPUTS:
        raise RequestError(422, "invalid_request", f"'input' has {len(value)} items; at most {MAX_INPUTS}")
    for i, item in enumerate(value):
        if not ((isinstance(item, str) and item) or _is_tokens(item)):
            raise RequestError(422, "invalid_request", f"input[{i}] must be a non-empty string or token array")


def parse_embeddings(data: dict, coalesce_header: str | None = None) -> tuple[str, dict, bool]:
    """(model, normalized body, coalesce) for an OpenAI embeddings body; RequestError."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(422, "invalid_request", "'model' must be a non-empty string")
    _check_input(data.get("input"))
    wanted = {"input": data["input"]}
    encoding = data.get("encoding_format")
    if encoding is not None:
        if encoding not in ENCODINGS:
            raise RequestError(422, "invalid_request", "'encoding_format' must be float or base64")
        wanted["encoding_format"] = encoding
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise RequestError(422, "invalid_request", "'dimensions' must be a positive integer")
        wanted["dimensions"] = dimensions
    user = data.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise RequestError(422, "invalid_request", "'user' must be a string")
        wanted["user"] = user
    # The same format both ways: every other field goes upstream as it came (issue 14), but
    # for sluice's own (`model` is mapped, `coalesce`/`provider` are sluice's).
    wanted.update({k: v for k, v in data.items() if k not in wanted and k not in OWNED_FIELDS})
    return model, {BODY_FIELD: wanted}, parse_coalesce(data, coalesce_header, refuse_field)


def routes(edge) -> list[Route]:
    async def embeddings(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return denied
        try:
            edge.check_in_service()
            data = await edge.json_body(request)
            model, body, coalesce = parse_embeddings(data, request.headers.get("x-sluice-coalesce"))
            provider, upstream_model, adapter = models.route(model, edge.settings)
            if adapter not in EMBEDDING_ADAPTERS:
                raise RequestError(400, "embeddings_not_supported", f"provider {provider!r} has no embeddings API")
            admission = await edge.admit(provider, upstream_model, body, None, coalesce, request.state.key_id)
        except Rejection as exc:
            return rejection_response(exc)
        answer, usage, end = None, None, None
        async with admission.serving(request.scope, request.receive):
            async for event in admission.events():
                if event["type"] == ev.META and event.get("embeddings"):
                    answer = event["embeddings"]
                elif event["type"] == ev.USAGE:
                    usage = event["usage"]
                elif ev.is_terminal(event):
                    end = event
        headers = {"x-request-id": admission.request_id}
        end = end or ev.error("disconnected", "the client went away")
        if end["type"] == ev.ERROR or answer is None:
            code = end.get("code", "upstream_malformed")
            return error_response(
                status_of_error(end), code, end.get("message", "the provider sent no embeddings"), headers
            )
        usage = end.get("usage") or usage or {}
        body_out = {
            "object": "list",
            "data": answer["data"],
            "model": model,  # the name the client asked for, as OpenAI echoes it
            "usage": {"prompt_tokens": usage.get("prompt_tokens") or 0, "total_tokens": usage.get("total_tokens") or 0},
        }
        return JSONResponse(body_out, headers=headers)

    return [Route("/v1/embeddings", embeddings, methods=["POST"])]
