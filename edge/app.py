"""The Starlette edge: parse, validate, translate to actor messages, stream back.

No business logic lives here: admission, coalescing and pacing are the actors' (through
edge/streams.py), rendering is edge/sse_stream.py's. Every error is a JSON body
`{"error": {"code", "message"}}` with the right status.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edge.bridge import ActorBridge, BridgeError
from edge.chat_request import RequestError, check_content_type, parse_chat, parse_json
from edge.dataplane import HubClient
from edge.records import RecordSender
from edge.sse_stream import SSEStream
from edge.streams import LocalStreams, Rejection, Subscriber, new_request_id
from protocols import messages as m
from protocols.config import PROVIDERS
from protocols.keys import coalescing_key

log = logging.getLogger("sluice.edge")

DIRECTORY_REFRESH_S = 1.0
SHUTDOWN_GRACE_S = 5.0


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class Edge:
    """The edge process's state: the bridge to the actors, the hub client, the streams."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.edge_id = f"edge-{os.getpid()}"
        self.bridge = ActorBridge(settings["SLUICE_ACTOR_PORT"])
        self.shutting_down = asyncio.Event()
        self.draining = False
        self._drain_set_at = 0.0  # a directory fetched before this may not undo it
        self.hub: HubClient | None = None
        self.streams: LocalStreams | None = None
        self.records: RecordSender | None = None
        self._refresher: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.bridge.start)
        await self._wait_for_hub(deadline_s=15.0)
        self.hub = HubClient(self._locate_hub)
        self.streams = LocalStreams(self.bridge, self.hub, self.edge_id, self.settings["COALESCER_SHARDS"])
        self.records = RecordSender(self.bridge, self.edge_id)
        self.records.start()
        self._refresher = asyncio.create_task(self._refresh_directory())
        try:
            yield
        finally:
            self.begin_shutdown()
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            await self.streams.close()
            await self.records.close()
            await self.hub.close()
            await loop.run_in_executor(None, self.bridge.close)

    def begin_shutdown(self) -> None:
        """Every open stream ends now with an error event (called on SIGINT/SIGTERM)."""
        self.shutting_down.set()

    async def _wait_for_hub(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            directory = await self.bridge.refresh_directory(force=True)
            if directory.hub:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Pool's stream hub did not come up")
            await asyncio.sleep(0.05)

    async def _locate_hub(self) -> tuple[str, int]:
        directory = await self.bridge.refresh_directory(force=True)
        if not directory.hub:
            raise OSError("the stream hub is not ready")
        return directory.hub[0], directory.hub[1]

    async def _refresh_directory(self) -> None:
        while True:
            await asyncio.sleep(DIRECTORY_REFRESH_S)
            asked_at = time.monotonic()
            try:
                directory = await self.bridge.refresh_directory(force=True)
            except BridgeError as exc:
                log.warning("directory refresh failed: %s", exc)
                continue
            if asked_at > self._drain_set_at:
                self.draining = bool(directory.settings.get("draining"))

    def set_draining(self, on: bool) -> None:
        """This edge drains (or stops draining) at once, not at the next refresh."""
        self.draining, self._drain_set_at = on, time.monotonic()

    def refusal(self) -> JSONResponse | None:
        """The 503 for a new request while draining or shutting down, else None."""
        if self.draining or self.shutting_down.is_set():
            return error_response(503, "draining", "the gateway is draining; retry on another instance", {"Retry-After": "5"})
        return None

    # --- routes -------------------------------------------------------------------------------
    async def chat(self, request: Request):
        if refused := self.refusal():
            return refused
        try:
            data = await self.json_body(request)
            chat = parse_chat(data, request.headers.get("x-sluice-coalesce"))
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.message)
        return await self.open_stream(chat.provider, chat.model, chat.body, chat.thread_id, chat.coalesce)

    async def open_stream(
        self, provider, model, body, thread_id, coalesce, on_end=None, renderer=None, before_terminal=None
    ):
        """Admit a normalized request and return its SSE response (or a JSON error).

        `on_end(sub, outcome)` runs when the client's stream ends; `renderer(sub)` makes
        the Renderer that picks the wire format (sluice's own by default);
        `before_terminal(sub, event)` is awaited before the terminal event is sent."""
        provider = provider or self.settings["SLUICE_PROVIDER"]
        configured = self.settings["providers"].get(provider)
        if configured is None:
            return self._provider_missing(provider)
        model = model or configured["model"]
        key = coalescing_key(provider, model, body, thread_id) if coalesce else ""
        request_id, received_at = new_request_id(), time.time()
        try:
            sub = await self.streams.join(request_id, provider, model, body, key, received_at)
        except Rejection as exc:
            self._record(request_id, "leader", received_at, {"outcome": "rejected", "error_code": exc.code})
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s else None
            return error_response(exc.status, exc.code, exc.message, headers)

        def ended(sub: Subscriber, outcome: dict) -> None:
            self.streams.leave(sub)
            self._record(sub.request_id, sub.role, sub.received_at, outcome)
            if on_end is not None:
                on_end(sub, outcome)

        return SSEStream(
            sub,
            self.settings["SLUICE_KEEPALIVE_S"],
            self.shutting_down,
            ended,
            renderer(sub) if renderer else None,
            before_terminal,
        )

    def _provider_missing(self, provider: str) -> JSONResponse:
        if provider not in PROVIDERS:
            return error_response(422, "invalid_request", f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")
        prefix = PROVIDERS[provider]
        return error_response(
            400,
            "provider_not_configured",
            f"provider {provider!r} is not configured: set {prefix}_API_KEY (or {prefix}_BASE_URL) and restart",
        )

    async def cancel(self, request: Request):
        request_id = request.path_params["request_id"]
        if not self.streams.cancel(request_id):
            return error_response(404, "not_found", f"no open stream with request id {request_id!r}")
        return JSONResponse({"request_id": request_id, "cancelled": True}, status_code=202)

    async def healthz(self, request: Request):
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request):
        try:
            directory = await self.bridge.refresh_directory(force=True)
            roles = [role for role in directory.entries if role != "supervisor"]
            answers = await asyncio.gather(*(self.bridge.ask(r, m.GetState(), timeout=2.0) for r in roles), return_exceptions=True)
        except BridgeError as exc:
            return JSONResponse({"ready": False, "reason": str(exc)}, status_code=503)
        status = {role: {"ok": isinstance(a, m.State), "pid": getattr(a, "state", {}).get("pid")} for role, a in zip(roles, answers)}
        complete = directory.settings.get("complete", True)  # False while an actor is being recreated
        ready = all(s["ok"] for s in status.values()) and bool(directory.hub) and complete and not self.shutting_down.is_set()
        return JSONResponse({"ready": ready, "actors": status, "draining": self.draining}, status_code=200 if ready else 503)

    async def performance(self, request: Request):
        raw = request.query_params.get("last_n", "100")
        try:
            last_n = int(raw)
            if not 1 <= last_n <= 100_000:
                raise ValueError
        except ValueError:
            return error_response(422, "invalid_request", f"last_n must be an integer 1..100000, got {raw!r}")
        reply = await self._ask_metrics(m.QueryPerformance(last_n))
        return reply if isinstance(reply, Response) else JSONResponse(reply.report)

    async def prometheus(self, request: Request):
        reply = await self._ask_metrics(m.QueryPrometheus())
        if isinstance(reply, Response):
            return reply
        return PlainTextResponse(reply.text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def alerts(self, request: Request):
        reply = await self._ask_metrics(m.QueryAlerts())
        return reply if isinstance(reply, Response) else JSONResponse(reply.report)

    async def _ask_metrics(self, msg):
        await self.records.flush()  # what this edge measured so far is included
        try:
            return await self.bridge.ask("metrics", msg, timeout=5.0)
        except BridgeError as exc:
            return error_response(503, "metrics_unavailable", str(exc))

    # --- helpers ------------------------------------------------------------------------------
    async def json_body(self, request: Request) -> dict:
        check_content_type(request.headers.get("content-type"))
        limit = self.settings["SLUICE_MAX_BODY_BYTES"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                break
        return parse_json(bytes(raw), limit)

    def _record(self, request_id: str, role: str, received_at: float, outcome: dict) -> None:
        now = time.time()
        self.records.add(
            {
                "kind": "request",
                "request_id": request_id,
                "role": role,
                "outcome": outcome["outcome"],
                "error_code": outcome.get("error_code"),
                "ttft_ms": outcome.get("ttft_ms"),
                "queue_wait_ms": outcome.get("queue_wait_ms"),
                "latency_ms": (now - received_at) * 1000.0,
                "at": now,
            }
        )


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route for {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), message.get(exc.status_code, str(exc.detail))
    )


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal_error", "the gateway failed on this request; it has been logged")


def create_app(settings: dict) -> tuple[Starlette, Edge]:
    """The app with the core routes; edge/routes.py adds the other groups."""
    edge = Edge(settings)
    routes = [
        Route("/api/chat", edge.chat, methods=["POST"]),
        Route("/api/chat/{request_id}/cancel", edge.cancel, methods=["POST"]),
        Route("/healthz", edge.healthz, methods=["GET"]),
        Route("/readyz", edge.readyz, methods=["GET"]),
        Route("/api/metrics/performance", edge.performance, methods=["GET"]),
        Route("/metrics", edge.prometheus, methods=["GET"]),
        Route("/api/alerts", edge.alerts, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=edge.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    return app, edge
