"""The access log: one line per HTTP request, written when its response has ended.

An ASGI middleware around the whole app, so it sees what really went out: the status,
the bytes sent (a stream's included), the time until the last byte. What only the stream
knows (its outcome, TTFT, queue wait, provider TTFT, who answered) the admission leaves in
the request's state under `STREAM_OUTCOME` (edge/admission.py `Admission.serving`, for
every front end); the request id is the response's `x-request-id`.

The line (INFO, logger `sluice.access`; the fields are `extra=` fields, see
protocols/logfmt.py): request_id, key_id (the API key's id, set by the key check as
`request.state.key_id`; never the key), client, method, route (the path template, not the
path: ids stay out), status, outcome (done / error / cancelled / rejected) with its
error_code, ttft_ms (streams), bytes_sent, duration_ms. Never a header, a prompt or a
message: only with SLUICE_LOG_PROMPTS=1 does the line carry the request's `messages`
(or a thread message's `content`).
"""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("sluice.access")

STREAM_OUTCOME = "sluice_stream_outcome"  # key in scope["state"]
_ERROR_BODY_LIMIT = 4096  # an error body's code is read from at most this much of it


class AccessLog:
    def __init__(self, app, log_prompts: bool = False, body_limit: int = 1 << 20):
        self.app, self.log_prompts, self.body_limit = app, log_prompts, body_limit
        self._routes: dict | None = None  # endpoint -> path template, built on first use

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent = {"status": None, "bytes": 0, "request_id": None, "error_body": b""}
        request_body = bytearray()

        async def receive_and_keep():
            message = await receive()
            if message["type"] == "http.request" and len(request_body) <= self.body_limit:
                request_body.extend(message.get("body", b""))
            return message

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        sent["request_id"] = value.decode("latin-1")
            await send(message)
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                sent["bytes"] += len(body)
                if sent["status"] is not None and sent["status"] >= 400 and len(sent["error_body"]) < _ERROR_BODY_LIMIT:
                    sent["error_body"] += body[:_ERROR_BODY_LIMIT]

        failed = None
        try:
            await self.app(scope, receive_and_keep if self.log_prompts else receive, send_and_count)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            fields = self._fields(scope, sent, failed, started)
            if self.log_prompts:
                fields.update(_prompt_of(bytes(request_body)))
            log.info("%s %s %s", fields["method"], fields["route"] or "-", fields["status"], extra=fields)

    def _fields(self, scope, sent: dict, failed: BaseException | None, started: float) -> dict:
        state = scope.get("state") or {}
        stream = state.get(STREAM_OUTCOME)
        status = sent["status"]
        if stream is not None:
            outcome, code, ttft = stream.get("outcome"), stream.get("error_code"), stream.get("ttft_ms")
        elif failed is not None and status is None:
            outcome, code, ttft = (
                ("error", "internal_error", None)
                if isinstance(failed, Exception)
                else ("cancelled", "disconnected", None)
            )
            status = 500 if isinstance(failed, Exception) else None
        elif status is not None and status >= 400:
            outcome, code, ttft = "rejected", _error_code(sent["error_body"]), None
        else:
            outcome, code, ttft = "done", None, None
        client = scope.get("client")
        return {
            "request_id": sent["request_id"],
            "key_id": state.get("key_id"),
            "client": client[0] if client else None,
            "method": scope.get("method"),
            "route": self._route_of(scope),
            "status": status,
            "outcome": outcome,
            "error_code": code,
            "ttft_ms": ttft,
            "bytes_sent": sent["bytes"],
            "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }

    def _route_of(self, scope) -> str | None:
        """The matched route's path template (the router put its endpoint in the scope)."""
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return None
        if self._routes is None:
            app = scope.get("app")
            routes = getattr(getattr(app, "router", None), "routes", [])
            self._routes = {route.endpoint: route.path for route in routes if hasattr(route, "endpoint")}
        return self._routes.get(endpoint)


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def _prompt_of(body: bytes) -> dict:
    """What the request asked, for SLUICE_LOG_PROMPTS=1 only."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: data[name] for name in ("messages", "content") if name in data}
