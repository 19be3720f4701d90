"""Chat thread routes: create a thread, send to it (an SSE reply), read it back.

A send stores the turn first (the thread store actor), then streams the reply through
the same path as /api/chat with the thread's history and the thread in the coalescing
key. The reply is written back when its stream ends: the text and "done" or "error"; a
reply every local client walked away from is stored as "cancelled" with the text
received so far.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.app import Edge, error_response
from edge.bridge import BridgeError
from edge.chat_request import RequestError, check_content_type, parse_json
from edge.streams import Subscriber
from protocols import events as ev
from protocols import messages as m


class ThreadRoutes:
    def __init__(self, edge: Edge):
        self.edge = edge
        self.listeners: dict[int, int] = {}  # assistant message id -> clients on this edge

    async def create(self, request: Request):
        reply = await self._ask(m.ThreadCreate())
        if not isinstance(reply, m.ThreadInfo):
            return reply
        return JSONResponse({"thread_id": reply.thread_id, "created_at": reply.created_at}, status_code=201)

    async def read(self, request: Request):
        reply = await self._ask(m.ThreadGet(request.path_params["thread_id"]))
        if not isinstance(reply, m.ThreadMessages):
            return reply
        return JSONResponse({"thread_id": reply.thread_id, "messages": reply.messages})

    async def send(self, request: Request):
        edge = self.edge
        if edge.draining or edge.shutting_down.is_set():
            return error_response(503, "draining", "the gateway is draining; retry on another instance", {"Retry-After": "5"})
        try:
            check_content_type(request.headers.get("content-type"))
            data = parse_json(await request.body(), edge.settings["SLUICE_MAX_BODY_BYTES"])
        except RequestError as exc:
            return error_response(exc.status, exc.code, exc.message)
        content = data.get("content")
        if not isinstance(content, str) or not content.strip():
            return error_response(422, "invalid_request", "'content' must be a non-empty string")
        for name in ("provider", "model"):
            if data.get(name) is not None and not isinstance(data[name], str):
                return error_response(422, "invalid_request", f"'{name}' must be a string")
        thread_id = request.path_params["thread_id"]
        turn = await self._ask(m.TurnBegin(thread_id, content))
        if not isinstance(turn, m.TurnBegun):
            return turn
        assistant_id = turn.assistant_id
        self.listeners[assistant_id] = self.listeners.get(assistant_id, 0) + 1

        def ended(sub: Subscriber, outcome: dict) -> None:
            self._ended(assistant_id, sub, outcome)

        response = await edge.open_stream(
            data.get("provider"), data.get("model"), {"messages": turn.history}, thread_id, True, on_end=ended
        )
        if isinstance(response, JSONResponse):  # refused before streaming (429, 503, ...)
            self._release(assistant_id)
            await edge.bridge.tell("threads", m.TurnEnd(assistant_id, "", "error", "rejected"))
        return response

    def _ended(self, assistant_id: int, sub: Subscriber, outcome: dict) -> None:
        last = self._release(assistant_id)
        events = sub.flight.events if sub.flight else []
        text = "".join(e["delta"] for e in events if e.get("type") == ev.DELTA)
        status = outcome["outcome"]
        if status == "cancelled" and not last:
            return  # others on this edge still stream this reply
        end = m.TurnEnd(assistant_id, text, status, outcome.get("error_code") if status == "error" else None)
        self.edge.streams.spawn(self.edge.bridge.tell("threads", end))

    def _release(self, assistant_id: int) -> bool:
        """One client fewer on this reply; True when it was the last one."""
        left = self.listeners.get(assistant_id, 1) - 1
        if left <= 0:
            self.listeners.pop(assistant_id, None)
            return True
        self.listeners[assistant_id] = left
        return False

    async def _ask(self, msg):
        try:
            return await self.edge.bridge.ask("threads", msg, timeout=5.0)
        except BridgeError as exc:
            if exc.code == "thread_not_found":
                return error_response(404, "thread_not_found", str(exc))
            return error_response(503, "threads_unavailable", f"the thread store did not answer: {exc}")


def routes(edge: Edge) -> list[Route]:
    threads = ThreadRoutes(edge)
    return [
        Route("/api/threads", threads.create, methods=["POST"]),
        Route("/api/threads/{thread_id}/messages", threads.send, methods=["POST"]),
        Route("/api/threads/{thread_id}/messages", threads.read, methods=["GET"]),
    ]
