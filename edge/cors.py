"""CORS: browser apps on other origins may call the client API (SLUICE_CORS_ORIGINS).

A small ASGI middleware rather than Starlette's CORSMiddleware, because the headers to
allow are families (`x-sluice-*`, and the `x-stainless-*` headers the official OpenAI and
Anthropic SDKs send from a browser), which CORSMiddleware can only allow all at once.

- Only the client API is shared: `/v1/*`, `/api/chat*`, `/api/threads*`. Never the admin
  routes, the metrics or the pages: a browser on another origin has no business there.
- No origin is allowed by default; SLUICE_CORS_ORIGINS lists them (`*`: any). The allowed
  origin is echoed back with `Vary: Origin`; credentials (cookies) are never allowed:
  clients authenticate with a header (Authorization, x-api-key), which must be listed.
- A preflight (OPTIONS with Access-Control-Request-Method) from an allowed origin, for a
  method and headers that are allowed, is answered 200 here with the Allow headers; one
  that asks for anything else is refused with 400 and no CORS headers (the browser then
  blocks the call). A preflight from another origin, or to another path, goes on to the
  app as any OPTIONS request would (405), without CORS headers.
- Actual requests from an allowed origin get Access-Control-Allow-Origin and
  Access-Control-Expose-Headers: x-request-id, retry-after.
"""

from __future__ import annotations

API_PREFIXES = ("/v1/", "/api/chat", "/api/threads")
METHODS = ("GET", "POST", "DELETE", "OPTIONS")
HEADERS = frozenset(
    {
        "accept",
        "authorization",
        "content-type",
        "x-api-key",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
        "openai-organization",
        "openai-project",
    }
)
HEADER_FAMILIES = ("x-sluice-", "x-stainless-")
EXPOSED = b"x-request-id, retry-after"
MAX_AGE_S = b"600"


def header_allowed(name: str) -> bool:
    name = name.strip().lower()
    return name in HEADERS or name.startswith(HEADER_FAMILIES)


class Cors:
    """The ASGI middleware: `origins` as parsed by protocols/config.py (`*` allows any)."""

    def __init__(self, app, origins: list[str]):
        self.app = app
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if not origin or not self.allowed(origin):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin, headers, send)
            return

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", EXPOSED),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, origin: str, headers: dict[str, str], send) -> None:
        method = headers["access-control-request-method"].strip().upper()
        wanted = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
        if method not in METHODS or not all(header_allowed(h) for h in wanted):
            body = (
                b'{"error": {"code": "cors_refused", "message": "this method or header is not allowed cross-origin"}}'
            )
            await _respond(send, 400, [(b"content-type", b"application/json")], body)
            return
        allow = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", ", ".join(METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(wanted).encode("latin-1")),
            (b"access-control-max-age", MAX_AGE_S),
            (b"vary", b"Origin"),
        ]
        await _respond(send, 200, allow, b"")


async def _respond(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
