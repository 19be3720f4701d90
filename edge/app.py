"""The Starlette edge: parse, validate, translate to actor messages, stream back.

No business logic lives here: coalescing and pacing are the actors' (through
edge/streams.py); `Edge.admit` checks a request and joins its flight, returning an
`Admission` (edge/admission.py) or raising a `Rejection` (edge/rejections.py); each front
end renders those in its own format (sluice's SSE: edge/sse_stream.py; the routes here and
in edge/threads.py, edge/openai_compat.py). Every error is a JSON body
`{"error": {"code", "message"}}` with the right status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route

from actors import secret as cluster_secret
from edge import anthropic_compat, models, openai_compat, tracing
from edge.admission import Admission
from edge.api_keys import (
    UNAUTHORIZED,
    ApiKeys,
    ClientKey,
    Denial,
    KeysFileError,
    conflicting_credentials,
    presented_key,
    stream_tokens,
)
from edge.bridge import ActorBridge, BridgeError
from edge.chat_request import RequestError, check_content_encoding, check_content_type, parse_chat, parse_json
from edge.dataplane import HubClients
from edge.measures import rejected, request_record
from edge.records import RecordSender
from edge.rejections import Rejection
from edge.sse_stream import SSEStream
from edge.streams import LocalStreams, new_request_id
from protocols import messages as m
from protocols.config import PROVIDERS
from protocols.gateway_settings import Settings
from protocols.keys import coalescing_key
from protocols.providers import adapter_for

if TYPE_CHECKING:  # the relay (and its httpcore) is loaded only with several workers: edge/worker.py
    from edge.worker_relay import WorkerRelay

log = logging.getLogger("sluice.edge")

DIRECTORY_REFRESH_S = 1.0
SHUTDOWN_GRACE_S = 5.0


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def rejection_response(exc: Rejection, headers: dict | None = None) -> JSONResponse:
    """A Rejection in sluice's shape. The client key table's refusals (they carry OpenAI's
    error type) keep OpenAI's shape, which holds sluice's `code` and `message` too."""
    if exc.type is not None:
        body = {"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}}
    else:
        body = {"error": {"code": exc.code, "message": exc.message}}
    return JSONResponse(body, status_code=exc.status, headers={**exc.headers(), **(headers or {})} or None)


def key_refusal(denial: Denial) -> Rejection:
    return Rejection(denial.status, denial.code, denial.message, denial.retry_after_s, denial.type)


class Edge:
    """The edge process's state: the bridge to the actors, the hub client, the streams."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # Random per process: the Coalescer's hub tickets name it (see docs/security.md).
        self.edge_id = f"edge-{os.getpid()}-{secrets.token_hex(8)}"
        self.bridge = ActorBridge(settings.actor_port)
        self.keys = ApiKeys(settings.api_keys_file)
        # Several edge processes (workers, hosts): the keys' usage is counted by the Metrics
        # actor (actors/key_limits.py). A leader with one worker counts here until a member
        # joins (`_refresh_directory`), then at the Metrics actor for good.
        self.shared_key_limits = self.keys.enabled and (settings.workers > 1 or settings.join is not None)
        self.coalesce_scope = settings.coalesce_scope
        self._keys_reloads = 0  # the Supervisor's count of reload-keys commands, as last seen
        self.shutting_down = asyncio.Event()
        self.draining = False  # the operator's drain (admin), shared through the Supervisor
        self.stopping = False  # this process drains before it exits (SIGTERM)
        self._drain_set_at = 0.0  # a directory fetched before this may not undo it
        self.hub: HubClients | None = None
        self.streams: LocalStreams | None = None
        self.records: RecordSender | None = None
        self._refresher: asyncio.Task | None = None
        self.parked: dict[str, Admission] = {}  # request id -> a resumable stream whose client is gone
        # SLUICE_WORKERS > 1 (set by edge/worker.py): ids name this worker; cancel and resume
        # of another worker's request are relayed to it (edge/worker_relay.py)
        self.relay: WorkerRelay | None = None

    # --- lifecycle --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.bridge.start)
        await self._wait_for_hub(deadline_s=15.0)
        self.hub = HubClients(self._locate_hub, cluster_secret.get(), self.edge_id)
        self.streams = LocalStreams(
            self.bridge, self.hub, self.edge_id, self.settings.coalescer_shards, self.settings.cluster_host
        )
        streams = self.streams
        self.bridge.on_stray = lambda role, answer: loop.call_soon_threadsafe(streams.stray_answer, role, answer)
        self.records = RecordSender(self.bridge, self.edge_id)
        self.records.start()
        tracing.setup_from_env()  # OpenTelemetry traces, when configured (edge/tracing.py)
        self._refresher = asyncio.create_task(self._refresh_directory())
        try:
            yield
        finally:
            self.begin_shutdown()
            self.streams.end_parked()  # their records go out with the rest
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            await self.streams.close()
            await self.records.close()
            tracing.shutdown()
            await self.hub.close()
            await loop.run_in_executor(None, self.bridge.close)

    def begin_shutdown(self) -> None:
        """Every open stream ends now with an error event (SIGINT, or a drain's end)."""
        self.shutting_down.set()

    def begin_stopping(self) -> None:
        """From now on /readyz says 503 and new requests are refused; open streams go on.
        A plain assignment: safe to call from a signal handler."""
        self.stopping = True

    async def drained(self, timeout_s: float) -> bool:
        """True once no client stream is open; False if `timeout_s` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.streams.idle.wait()
        except TimeoutError:
            return False
        return True

    def open_streams(self) -> int:
        return len(self.streams.by_request) if self.streams is not None else 0

    async def _wait_for_hub(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            directory = await self.bridge.refresh_directory(force=True)
            if directory.hub:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Pool's stream hub did not come up")
            await asyncio.sleep(0.05)

    async def _locate_hub(self, pool: str = "pool") -> tuple[str, int]:
        directory = await self.bridge.refresh_directory(force=True)
        address = (directory.hubs or {}).get(pool) or (directory.hub if pool == "pool" else None)
        if not address:
            raise OSError(f"the stream hub of {pool} is not ready")
        return address[0], address[1]

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
            self._follow_keys_reloads(directory.settings.get("keys_reloads", 0))
            self._follow_hosts(directory.settings.get("hosts", 1))

    def _follow_hosts(self, hosts: object) -> None:
        """A member joined this edge's cluster: from now on its keys are counted with every
        other host's, at the Metrics actor (docs/scale-out.md). Requests admitted before
        finish where they were counted; the switch is for good (a member may join again)."""
        if self.keys.enabled and not self.shared_key_limits and isinstance(hosts, int) and hosts > 1:
            self.shared_key_limits = True
            log.warning("a member joined the cluster: client key limits are counted cluster-wide from now on")

    def _follow_keys_reloads(self, reloads: int) -> None:
        """`run.py admin reload-keys` (from any process) bumps the Supervisor's count."""
        if reloads != self._keys_reloads:
            self._keys_reloads = reloads
            try:
                self.keys.reload()
            except KeysFileError as exc:  # the old keys stay in force
                log.error("reload-keys: the previous keys stay in force: %s", exc)

    def set_draining(self, on: bool) -> None:
        """This edge drains (or stops draining) at once, not at the next refresh."""
        self.draining, self._drain_set_at = on, time.monotonic()

    def out_of_service(self) -> bool:
        return self.draining or self.stopping or self.shutting_down.is_set()

    def check_in_service(self) -> None:
        """Raises the 503 Rejection for a new request while draining or shutting down."""
        if self.out_of_service():
            raise Rejection(503, "draining", "the gateway is draining; retry on another instance", 5)

    def refusal(self) -> JSONResponse | None:
        """`check_in_service` as sluice's 503 response, else None."""
        try:
            self.check_in_service()
        except Rejection as exc:
            return rejection_response(exc)
        return None

    def authenticate(self, request: Request) -> JSONResponse | None:
        """Who calls: sets `request.state.key_id` (the API key's id; None with open access)
        or answers the 401. Every client route calls this first."""
        request.state.key_id = None
        presented = presented_key(request.headers)
        conflict = conflicting_credentials(request.headers) if self.keys.enabled else None
        if conflict is not None:
            self.keys.failures["invalid"] += 1
            found: ClientKey | Denial | None = Denial(401, "invalid_request_error", UNAUTHORIZED, conflict)
        else:
            found = self.keys.authenticate(presented)
        if isinstance(found, Denial):
            if self.shared_key_limits:
                self.records.add({"kind": "key_auth_failure", "reason": "missing" if presented is None else "invalid"})
            return rejection_response(key_refusal(found), {"WWW-Authenticate": 'Bearer realm="sluice"'})
        request.state.key_id = found.id if found is not None else None
        return None

    # --- admission ---------------------------------------------------------------------------
    async def admit(
        self,
        provider: str | None,
        model: str | None,
        body: dict,
        thread_id: str | None,
        coalesce: bool,
        key_id: str | None,
    ) -> Admission:
        """Admit a normalized request for one client: raises Rejection, else its Admission.

        Resolves the provider and model (edge/models.py: aliases, "provider/model"; None:
        the configured ones), checks `key_id` (from
        `authenticate`; None: open access) against its key's models and limits, and joins
        the flight for the coalescing key (scoped to the key when COALESCE_SCOPE=key). The
        Coalescer's or Pacer's refusal is recorded; a key's is counted per key (/metrics).
        `Admission.serving` closes the Admission on every path (docs/architecture.md).
        """
        self.check_in_service()
        provider, model = models.resolve(provider, model, self.settings)  # aliases, provider/model
        provider = provider or self.settings.provider
        configured = self.settings.providers.get(provider)
        if configured is None:
            raise self._provider_missing(provider)
        if model is not None and len(model) > models.MAX_MODEL_CHARS:  # a client's (a metrics label)
            raise Rejection(
                422, "invalid_request", f"model: at most {models.MAX_MODEL_CHARS} characters, got {len(model)}"
            )
        model = model or configured.model
        # A field the provider's API cannot honour is refused here, before any admission
        # (docs/providers.md): never dropped silently on the way upstream.
        if (problem := adapter_for(configured.adapter, body).check(body)) is not None:
            raise Rejection(400, "unsupported_parameter", problem)
        shared = self.shared_key_limits  # where this request's key usage is counted, to its end
        if (denied := await self.admit_key(key_id, provider, model, shared)) is not None:
            raise key_refusal(denied)  # counted per key (/metrics), not as a gateway error
        client_id = key_id if self.coalesce_scope == "key" else None
        key = coalescing_key(provider, model, body, thread_id, client_id) if coalesce else ""
        request_id = self.relay.new_request_id() if self.relay is not None else new_request_id()
        received_at = time.time()
        try:
            sub = await self.streams.join(request_id, provider, model, body, key, received_at)
        except Rejection as exc:
            self.finish_key(key_id, "rejected", 0, shared)
            self._record(request_id, "leader", received_at, rejected(exc.code, provider, model), key_id)
            raise
        except BaseException:  # the client went away while being admitted
            self.finish_key(key_id, "cancelled", 0, shared)
            raise
        sub.key_id, sub.key_shared = key_id, shared  # it owns the request: only this key may cancel it
        return Admission(sub, body, self.shutting_down, self._release)

    def _release(self, admission: Admission, outcome: dict) -> None:
        """A client's stream has ended (Admission.close): everything admit took is given back;
        a resumable one whose client disconnected is parked instead (it ends in `_expired`)."""
        sub = admission.sub
        if sub.resumable and outcome.get("error_code") == "disconnected" and not self.shutting_down.is_set():
            admission.parked = True
            self.parked[sub.request_id] = admission
            grace_s = self.settings.resume_grace_s
            self.streams.park(sub, grace_s, lambda: self._expired(admission, outcome))
            return
        self.streams.leave(sub)
        self._finish(admission, outcome)

    def _expired(self, admission: Admission, outcome: dict) -> None:
        """A parked stream nobody resumed (it has left its flight): recorded as it ended."""
        self.parked.pop(admission.request_id, None)
        admission.parked = False
        self._finish(admission, outcome)
        if admission.on_expiry is not None:
            admission.on_expiry()

    def _finish(self, admission: Admission, outcome: dict) -> None:
        """The request is over for good: its key is charged and its one record sent."""
        sub = admission.sub
        if sub.key_id is not None:  # open access charges nothing: skip the count
            tokens = stream_tokens(admission.body, admission.received())
            self.finish_key(sub.key_id, outcome["outcome"], tokens, sub.key_shared)
        self._record(sub.request_id, sub.role, sub.received_at, outcome, sub.key_id)

    async def admit_key(self, key_id: str | None, provider: str, model: str, shared: bool) -> Denial | None:
        """The key's model list and limits (edge/api_keys.py): here with one edge process;
        with several (`shared`), by one ask to the Metrics actor, which counts for every
        worker and host (actors/key_limits.py), with the key's entry from this edge's file."""
        if not shared or key_id is None:
            return self.keys.admit(key_id, provider, model)
        key = self.keys.by_id.get(key_id)
        if key is None:  # removed by a reload since it authenticated
            return Denial(401, "invalid_request_error", UNAUTHORIZED, "the API key is not valid")
        ask = m.KeyAdmit(key_id, provider, model, self.edge_id, key.to_wire())
        try:
            verdict = await self.bridge.ask("metrics", ask, timeout=5.0)
        except BridgeError:
            verdict = None
        if not isinstance(verdict, m.KeyVerdict):
            return Denial(
                503, "api_error", "key_limits_unavailable", "the gateway cannot count this key's usage now; retry", 1.0
            )
        return Denial(**verdict.denial) if verdict.denial is not None else None

    def finish_key(self, key_id: str | None, outcome: str, tokens: int, shared: bool) -> None:
        """An admitted request ended: its stream and tokens are released and charged where
        they were counted (this process, or the Metrics actor through the record batch)."""
        if key_id is None:
            return
        if shared:
            self.records.add(
                {"kind": "key_finish", "key_id": key_id, "outcome": outcome, "tokens": tokens, "edge_id": self.edge_id}
            )
        else:
            self.keys.finish(key_id, outcome, tokens)

    def _provider_missing(self, provider: str) -> Rejection:
        if provider not in PROVIDERS:
            return Rejection(422, "invalid_request", f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")
        prefix = PROVIDERS[provider]
        return Rejection(
            400,
            "provider_not_configured",
            f"provider {provider!r} is not configured: set {prefix}_API_KEY (or {prefix}_BASE_URL) and restart",
        )

    # --- routes -------------------------------------------------------------------------------
    async def chat(self, request: Request):
        """sluice's own front end: parse, authenticate, admit, render as SSE."""
        if (denied := self.authenticate(request)) is not None:
            return denied
        try:
            self.check_in_service()  # before reading a body this edge will not serve
            data = await self.json_body(request)
            chat = parse_chat(data, request.headers.get("x-sluice-coalesce"))
            admission = await self.admit(
                chat.provider, chat.model, chat.body, chat.thread_id, chat.coalesce, request.state.key_id
            )
        except Rejection as exc:
            return rejection_response(exc)
        return self.resumable(
            admission, SSEStream(admission, self.settings.keepalive_s), chat.resumable or opted_in(request)
        )

    def resumable(self, admission: Admission, app, resumable: bool):
        """Returns `app`, the ASGI app serving `admission`; with `resumable` a disconnect
        parks the stream and `GET /api/chat/{request_id}/events` serves it with `app` again."""
        admission.sub.resumable = resumable
        admission.app = app
        return app

    async def resume(self, request: Request):
        """`GET /api/chat/{request_id}/events`: a parked resumable stream, from the event
        after `Last-Event-ID` (header, or `?last_event_id=`; none: from the first)."""
        if (denied := self.authenticate(request)) is not None:
            return denied
        request_id, key_id = request.path_params["request_id"], request.state.key_id
        if (relay := self.relayed(request, request_id)) is not None:
            return relay
        raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "-1"
        try:
            after = int(raw)
        except ValueError:
            return error_response(
                422, "invalid_request", f"Last-Event-ID must be an event id (an integer), got {raw!r}"
            )
        admission = self.parked.get(request_id)
        if admission is None or admission.sub.key_id != key_id:  # another key's: as unknown
            sub = self.streams.by_request.get(request_id)
            if admission is None and sub is not None and sub.resumable and sub.key_id == key_id:
                return error_response(
                    409,
                    "still_streaming",
                    f"request {request_id!r} is still streaming to its first connection; retry once that one is gone",
                    {"Retry-After": "1"},
                )
            return error_response(
                404,
                "not_found",
                f"no resumable stream with request id {request_id!r}: unknown, "
                "not resumable, or its SLUICE_RESUME_GRACE_S has passed",
            )
        known = len(admission.received())
        if not -1 <= after < known:
            return error_response(
                422,
                "invalid_request",
                f"Last-Event-ID {after} is not an event of this stream (ids 0..{known - 1} so far)",
            )
        if request.method == "HEAD":  # safe (RFC 9110): says a GET would resume it, takes nothing
            return Response(status_code=200, media_type="text/event-stream")
        if not self.streams.resume(admission.sub):  # its deadline passed this very moment
            return error_response(404, "not_found", f"no resumable stream with request id {request_id!r}")
        del self.parked[request_id]
        admission.resume(after)
        return admission.app

    async def cancel(self, request: Request):
        if (denied := self.authenticate(request)) is not None:
            return denied
        request_id = request.path_params["request_id"]
        if (relay := self.relayed(request, request_id)) is not None:
            return relay
        # another key's request is answered as unknown: its existence is not the caller's business
        if not self.streams.cancel(request_id, request.state.key_id):
            return error_response(404, "not_found", f"no open stream with request id {request_id!r}")
        return JSONResponse({"request_id": request_id, "cancelled": True}, status_code=202)

    def relayed(self, request: Request, request_id: str):
        """With several workers: the relay to the worker that owns `request_id` (it checks
        the caller's key again and answers), or None when the request is this worker's to
        answer. The caller's key has been checked here already (401 here, as for any route)."""
        if self.relay is None:
            return None
        return self.relay.route(request.scope, request_id, self.shutting_down)

    async def healthz(self, request: Request):
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request):
        if self.out_of_service():  # at once, without asking the actors: the balancer must stop sending now
            body = {
                "ready": False,
                "draining": True,
                "stopping": self.stopping or self.shutting_down.is_set(),
                "open_streams": self.open_streams(),
            }
            return JSONResponse(body, status_code=503)
        try:
            directory = await self.bridge.refresh_directory(force=True)
            roles = [role for role in directory.entries if role != "supervisor"]
            answers = await asyncio.gather(
                *(self.bridge.ask(r, m.GetState(), timeout=2.0) for r in roles), return_exceptions=True
            )
        except BridgeError as exc:
            return JSONResponse({"ready": False, "reason": str(exc)}, status_code=503)
        status = {
            role: {"ok": isinstance(a, m.State), "pid": getattr(a, "state", {}).get("pid")}
            for role, a in zip(roles, answers)
        }
        complete = directory.settings.get("complete", True)  # False while an actor is being recreated
        ready = all(s["ok"] for s in status.values()) and bool(directory.hub) and complete and not self.out_of_service()
        return JSONResponse(
            {"ready": ready, "actors": status, "draining": self.out_of_service()}, status_code=200 if ready else 503
        )

    async def performance(self, request: Request):
        raw = request.query_params.get("last_n", "100")
        try:
            last_n = int(raw)
            if not 1 <= last_n <= 100_000:
                raise ValueError
        except ValueError:
            return error_response(422, "invalid_request", f"last_n must be an integer 1..100000, got {raw!r}")
        reply = await self._ask_metrics(m.QueryPerformance(last_n))
        if isinstance(reply, Response):
            return reply
        if isinstance(reply.report.get("coalesce"), dict):
            reply.report["coalesce"]["scope"] = self.coalesce_scope
        return JSONResponse(reply.report)

    async def prometheus(self, request: Request):
        reply = await self._ask_metrics(m.QueryPrometheus())
        if isinstance(reply, Response):
            return reply
        # this edge's own figures follow the Metrics actor's: coalescing scope, per-key usage
        scope = (
            "# HELP sluice_coalesce_scope Which requests may share an upstream call (key: same API key only).\n"
            "# TYPE sluice_coalesce_scope gauge\n"
            f'sluice_coalesce_scope{{scope="{self.coalesce_scope}"}} 1\n'
        )
        # with several workers the Metrics actor renders the per-key lines, over all of them
        text = reply.text + scope + ("" if self.shared_key_limits else self.keys.prometheus())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

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
        check_content_encoding(request.headers.get("content-encoding"))
        return parse_json(await self.read_body(request), self.settings.max_body_bytes)

    async def read_body(self, request: Request) -> bytes:
        """The request's body, read against SLUICE_MAX_BODY_BYTES (at most one chunk over:
        the caller refuses it) and SLUICE_BODY_TIMEOUT_S; every body the edge reads comes
        through here (the admin routes' too). Raises RequestError (413, 408, 400)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and (len(declared) > 19 or int(declared) > limit):
            raise RequestError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
        raw = bytearray()
        deadline = self.settings.body_timeout_s
        try:
            # A body sent slowly or not at all would hold the connection for ever (the
            # header deadline stops at the headers: edge/http_limits.py).
            async with asyncio.timeout(deadline):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        break
        except ClientDisconnect:  # gone before its body was whole: nobody reads an answer
            raise RequestError(400, "client_disconnected", "the client left before sending its whole body") from None
        except TimeoutError:
            raise RequestError(
                408, "body_timeout", f"the request body was not complete within {deadline:g} s ({len(raw)} bytes came)"
            ) from None
        return bytes(raw)

    def _record(self, request_id: str, role: str, received_at: float, outcome: dict, key_id: str | None = None) -> None:
        """The request's one record (edge/measures.py), batched to Metrics."""
        self.records.add(request_record(request_id, role, received_at, outcome, time.time(), key_id))


def _error_shape(path: str):
    """The error renderer of the API a path belongs to: Anthropic's for /v1/messages,
    OpenAI's for the rest of /v1, sluice's elsewhere (docs/providers.md, "Endpoints")."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_compat.error_response
    if path == "/v1" or path.startswith("/v1/"):
        return openai_compat.error_response
    return error_response


def opted_in(request: Request) -> bool:
    """`X-Sluice-Resumable: 1` (or true/yes/on) opts a stream in to resuming."""
    return request.headers.get("x-sluice-resumable", "").strip().lower() in ("1", "true", "yes", "on")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route for {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return _error_shape(request.url.path)(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        message.get(exc.status_code, str(exc.detail)),
        headers or None,
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path (RFC 9110: a 405 names them in Allow).
    Starlette's own Allow names only the first route that matched the path, and a path may
    be served by two (GET and POST /api/threads/{id}/messages)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error_shape(request.url.path)(
        500, "internal_error", "the gateway failed on this request; it has been logged"
    )


def create_app(settings: Settings) -> tuple[Starlette, Edge]:
    """The app with the core routes; edge/routes.py adds the other groups."""
    edge = Edge(settings)
    routes = [
        Route("/api/chat", edge.chat, methods=["POST"]),
        Route("/api/chat/{request_id}/cancel", edge.cancel, methods=["POST"]),
        Route("/api/chat/{request_id}/events", edge.resume, methods=["GET"]),
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
