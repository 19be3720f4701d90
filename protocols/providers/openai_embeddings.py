"""OpenAI Embeddings (`POST /v1/embeddings`): an upstream call whose "stream" is one JSON body.

Owns: the request for an embeddings call and the parse of its answer, in the same sans-I/O
shape as every chat adapter, so the Pool runs it like any other call (pacing, retries
before the first byte, cancel, the hub, coalescing: identical requests in flight share one
call). The Pool picks this adapter instead of the provider's chat adapter when the
normalized body is an embeddings request (`is_embeddings`).

The normalized body (built by edge/embeddings.py) is `{"embeddings": {"input", "encoding_format"?,
"dimensions"?, "user"?, ...any other field the client sent}}`, all sent as they came; the answer's body is read whole (bounded by MAX_FRAME_BYTES) and
becomes, at the end of the response:

    meta(embeddings={"data": [...], "model": str})   the provider's embedding objects, as sent
    usage(prompt_tokens, 0, total_tokens)
    finish("stop")

OpenAI, OpenAI-compatible servers (Ollama's /v1/embeddings) and sluice's simulated
provider speak it; `EMBEDDING_ADAPTERS` names the providers that do.
"""

from __future__ import annotations

from protocols.providers import base
from protocols.providers.base import Malformed, error_from_response, field

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

DEFAULT_BASE_URL = "https://api.openai.com"
PATH = "/v1/embeddings"
BODY_FIELD = "embeddings"  # the normalized body's field that makes it an embeddings request
# Provider adapters whose API has an OpenAI-style /v1/embeddings.
EMBEDDING_ADAPTERS = frozenset({"openai", "openai_responses", "simulated", "ollama"})


def is_embeddings(body: dict) -> bool:
    return isinstance(body.get(BODY_FIELD), dict)


class Parser(base.Parser):
    TERMINATOR = "the end of the JSON body"
    STREAMED = False

    def __init__(self) -> None:
        super().__init__()
        self._body = bytearray()

    def feed(self, chunk: bytes) -> list[dict]:
        self._out = []
        if not self._over and chunk:
            self._body += chunk
            if len(self._body) > base.MAX_FRAME_BYTES:
                self.fail("upstream_malformed", f"embeddings answer longer than {base.MAX_FRAME_BYTES} bytes")
        return self._out

    def on_eof(self) -> None:  # close() guards it: a bad body is an upstream_malformed error
        obj = self.load(bytes(self._body))
        if "error" in obj:
            self.provider_error(obj["error"])
            return
        data = field(obj, "data", list)
        if data is None or not all(isinstance(item, dict) and "embedding" in item for item in data):
            raise Malformed("'data' must be a list of embedding objects")
        self.meta(embeddings={"data": data, "model": field(obj, "model", str, "")})
        usage = field(obj, "usage", dict, {})
        self.set_usage(usage.get("prompt_tokens"), 0, usage.get("total_tokens"))
        self.end()


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    wanted = body[BODY_FIELD]
    # every field the client sent, as it came (the edge checked the ones it knows); model mapped
    payload = {"model": model, "input": wanted["input"]}
    payload.update({k: v for k, v in wanted.items() if k not in payload and v is not None})
    return base.json_request(
        base.join_url(base_url or DEFAULT_BASE_URL, PATH), base.bearer(api_key), payload, accept=b"application/json"
    )


def check(body: dict) -> str | None:
    """Nothing to refuse: edge/embeddings.py built the body from the fields this API takes."""
    return None
