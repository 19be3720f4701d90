"""The floor for bench/cores.py: a bare Starlette streaming pass-through proxy.

    FLOOR_UPSTREAM=http://127.0.0.1:PORT python -m uvicorn bench.floor_proxy:app --workers N ...

`POST /v1/chat/completions` is sent on, body and all, to `$FLOOR_UPSTREAM` over one
`httpcore.AsyncConnectionPool` per worker (HTTP/1.1, keep-alive, no connection cap that a
benchmark could reach), and the upstream's bytes are streamed back as they arrive. No
parsing, no pacing, no coalescing, no storage: what any Python ASGI proxy must spend at
least, so "sluice adds N × what the floor adds" is a fair figure. httpcore is httpx's own
transport (sluice already depends on it), so the floor costs what the issue's
Starlette + httpx floor costs, less httpx's thin request/response wrappers.

It imports nothing from sluice.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import httpcore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8001").rstrip("/")
POOL: dict[str, httpcore.AsyncConnectionPool] = {}
TIMEOUTS = {"connect": 10.0, "read": 60.0, "write": 10.0, "pool": 60.0}


@asynccontextmanager
async def lifespan(app):
    POOL["upstream"] = httpcore.AsyncConnectionPool(
        http1=True, http2=False, max_connections=10_000, max_keepalive_connections=10_000, keepalive_expiry=60.0
    )
    try:
        yield
    finally:
        await POOL.pop("upstream").aclose()


async def chat(request: Request):
    body = await request.body()
    headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
    auth = request.headers.get("authorization")
    if auth:
        headers.append((b"authorization", auth.encode()))
    call = POOL["upstream"].stream(
        "POST", UPSTREAM + "/v1/chat/completions", headers=headers, content=body, extensions={"timeout": TIMEOUTS}
    )
    response = await call.__aenter__()

    async def relay():
        try:
            async for chunk in response.aiter_stream():
                yield chunk
        finally:
            await call.__aexit__(None, None, None)  # a client that left closes the upstream call too

    content_type = dict(response.headers).get(b"content-type", b"text/event-stream").decode()
    return StreamingResponse(relay(), status_code=response.status, media_type=content_type)


async def health(request: Request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health, methods=["GET"])],
    lifespan=lifespan,
)
