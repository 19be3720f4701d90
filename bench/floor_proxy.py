"""The floor for bench/cores.py: a bare Starlette streaming pass-through proxy.

    FLOOR_UPSTREAM=http://127.0.0.1:PORT python -m uvicorn bench.floor_proxy:app --workers N ...

`POST /v1/chat/completions` is sent on, body and all, to `$FLOOR_UPSTREAM` over one
`httpcore.AsyncConnectionPool` per worker (HTTP/1.1, keep-alive, no connection cap that a
benchmark could reach), and the upstream's bytes are streamed back as they arrive. No
parsing, no pacing, no coalescing, no storage: what any Python ASGI proxy must spend at
least, so "sluice adds N × what the floor adds" is a fair figure. httpcore is httpx's own
transport (sluice already depends on it), so the floor costs what the issue's
Starlette + httpx floor costs, less httpx's request/response wrappers. `FLOOR_CLIENT=httpx`
runs the issue's floor itself (`httpx.AsyncClient`, `send(stream=True)`, `aiter_raw`): it
measured ~7 % more CPU a stream (bench/NOTES.md, "The floor with httpx"), so the default
is the stricter floor.

It imports nothing from sluice.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import httpcore
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8001").rstrip("/")
POOL: dict[str, httpcore.AsyncConnectionPool] = {}
CLIENT: dict = {}  # FLOOR_CLIENT=httpx: an httpx.AsyncClient (httpx is imported only then: not a dependency)
HTTPX = os.environ.get("FLOOR_CLIENT", "httpcore") == "httpx"
TIMEOUTS = {"connect": 10.0, "read": 60.0, "write": 10.0, "pool": 60.0}


@asynccontextmanager
async def lifespan(app):
    if HTTPX:
        import httpx

        CLIENT["upstream"] = httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
    else:
        POOL["upstream"] = httpcore.AsyncConnectionPool(
            http1=True, http2=False, max_connections=10_000, max_keepalive_connections=10_000, keepalive_expiry=60.0
        )
    try:
        yield
    finally:
        for pool in POOL.values():
            await pool.aclose()
        for client in CLIENT.values():
            await client.aclose()
        POOL.clear()
        CLIENT.clear()


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


async def chat_httpx(request: Request):
    """The same pass-through as users write it with httpx (the issue's floor)."""
    body = await request.body()
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    auth = request.headers.get("authorization")
    if auth:
        headers["authorization"] = auth
    client = CLIENT["upstream"]
    upstream = await client.send(
        client.build_request("POST", UPSTREAM + "/v1/chat/completions", content=body, headers=headers), stream=True
    )
    return StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type", "text/event-stream"),
        background=BackgroundTask(upstream.aclose),
    )


async def health(request: Request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_httpx if HTTPX else chat, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ],
    lifespan=lifespan,
)
