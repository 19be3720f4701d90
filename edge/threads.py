"""Chat thread routes: create a thread, send to it (an SSE reply), read it back.

A send stores the turn first (the thread store actor), then streams the reply through
the same path as /api/chat with the thread's history and the thread in the coalescing
key. When the stream ends, the reply's text and "done" or "error" are stored *before*
the client gets its terminal event, so a client that sends its next message as soon as
it has read "done" finds the reply in the history. A reply every local client walked
away from is stored as "cancelled" with the text received so far ("interrupted" when the
gateway shut down under it).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.admission import Admission
from edge.app import Edge, error_response, opted_in, rejection_response
from edge.bridge import BridgeError, BridgeTimeout
from edge.rejections import Rejection
from edge.sse_stream import SSEStream
from protocols import events as ev
from protocols import messages as m

log = logging.getLogger("sluice.edge.threads")

PER_CLIENT_CODES = ("cancelled", "shutting_down")  # end one client's stream, not the reply
# How long a send waits for the delivery of an earlier send's TurnAbandon on its thread
# (one to a frozen store is delivered only once it thaws; the TurnBegin would wait as long).
ABANDON_WAIT_S = 5.0


class ThreadRoutes:
    def __init__(self, edge: Edge):
        self.edge = edge
        self.listeners: dict[int, int] = {}  # assistant message id -> clients on this edge
        self.finals: dict[int, asyncio.Future] = {}  # assistant message id -> its final write
        self.abandoning: dict[str, asyncio.Task] = {}  # thread id -> its TurnAbandon, until delivered

    async def create(self, request: Request):
        if (denied := self.edge.authenticate(request)) is not None:
            return denied
        if refused := self.edge.refusal():
            return refused
        reply = await self._ask(m.ThreadCreate(request.state.key_id))
        if not isinstance(reply, m.ThreadInfo):
            return reply
        return JSONResponse({"thread_id": reply.thread_id, "created_at": reply.created_at}, status_code=201)

    async def read(self, request: Request):
        if (denied := self.edge.authenticate(request)) is not None:
            return denied
        reply = await self._ask(m.ThreadGet(request.path_params["thread_id"], request.state.key_id))
        if not isinstance(reply, m.ThreadMessages):
            return reply
        return JSONResponse({"thread_id": reply.thread_id, "messages": reply.messages})

    async def send(self, request: Request):
        edge = self.edge
        if (denied := edge.authenticate(request)) is not None:
            return denied
        if refused := edge.refusal():
            return refused
        try:
            data = await edge.json_body(request)  # content type, size and limits checked
        except Rejection as exc:
            return rejection_response(exc)
        content = data.get("content")
        if not isinstance(content, str) or not content.strip():
            return error_response(422, "invalid_request", "'content' must be a non-empty string")
        resumable = data.get("resumable", False)
        if not isinstance(resumable, bool):
            return error_response(422, "invalid_request", "'resumable' must be true or false")
        for name in ("provider", "model"):
            if data.get(name) is not None and not isinstance(data[name], str):
                return error_response(422, "invalid_request", f"'{name}' must be a string")
        thread_id = request.path_params["thread_id"]
        token = secrets.token_hex(8)
        await self._abandoned_first(thread_id)
        turn = await self._ask(m.TurnBegin(thread_id, content, request.state.key_id, edge.edge_id, token))
        if not isinstance(turn, m.TurnBegun):
            return turn
        assistant_id = turn.assistant_id
        self.listeners[assistant_id] = self.listeners.get(assistant_id, 0) + 1
        try:
            admission = await edge.admit(
                data.get("provider"),
                data.get("model"),
                {"messages": turn.history},
                thread_id,
                True,
                request.state.key_id,
            )
        except Rejection as exc:  # refused before streaming (429, 503, 422, ...)
            # Undo the turn (unless another request joined it), as for a 503 from the store:
            # a refused message kept in the thread went upstream with every later turn, and
            # the client's retry stored it twice.
            self._release(assistant_id)
            self._abandon(thread_id, token)
            return rejection_response(exc)
        except BaseException:  # the client went away while being admitted
            if self._release(assistant_id):
                edge.streams.spawn(edge.bridge.tell("threads", m.TurnEnd(assistant_id, "", "cancelled")))
            raise
        return edge.resumable(admission, self._reply(assistant_id, admission), resumable or opted_in(request))

    def _reply(self, assistant_id: int, admission: Admission):
        """The reply as sluice's SSE, stored before its terminal event is written."""

        async def store_first(event: dict) -> None:
            await self._store_final(assistant_id, admission, event)

        stream = SSEStream(admission, self.edge.settings.keepalive_s, before_terminal=store_first)

        async def reply(scope, receive, send) -> None:
            try:
                await stream(scope, receive, send)
            finally:  # the admission is closed by now, with its outcome (or parked for a resume)
                if admission.parked:
                    admission.on_expiry = lambda: self._ended(assistant_id, admission)
                else:
                    self._ended(assistant_id, admission)

        return reply

    async def _store_final(self, assistant_id: int, admission: Admission, event: dict) -> None:
        """The stream ended: store the reply once, however many clients share it."""
        if event["type"] == ev.ERROR and event.get("code") in PER_CLIENT_CODES:
            return
        final = self.finals.get(assistant_id)
        if final is None:
            status = "done" if event["type"] == ev.DONE else "error"
            end = m.TurnEnd(assistant_id, _text(admission), status, event.get("code") if status == "error" else None)
            final = self.finals[assistant_id] = asyncio.ensure_future(self.edge.bridge.ask("threads", end, timeout=5.0))
        try:
            await asyncio.shield(final)
        except BridgeError as exc:  # the client still gets its terminal event
            log.warning("reply %s not stored: %s", assistant_id, exc)

    def _ended(self, assistant_id: int, admission: Admission) -> None:
        last = self._release(assistant_id)
        if not last:
            return  # others on this edge still stream this reply
        if self.finals.pop(assistant_id, None) is not None:
            return  # stored already, when the stream ended
        status = "interrupted" if admission.outcome.get("error_code") == "shutting_down" else "cancelled"
        self.edge.streams.spawn(self.edge.bridge.tell("threads", m.TurnEnd(assistant_id, _text(admission), status)))

    def _release(self, assistant_id: int) -> bool:
        """One client fewer on this reply; True when it was the last one."""
        left = self.listeners.get(assistant_id, 1) - 1
        if left <= 0:
            self.listeners.pop(assistant_id, None)
            return True
        self.listeners[assistant_id] = left
        return False

    def _abandon(self, thread_id: str, token: str) -> None:
        """Undo turn `token` at the store (unless another request joined it). A task, so the
        client's answer stays its own whatever the tell meets; the thread's next send on this
        edge waits for its delivery (`_abandoned_first`)."""
        task = self.edge.streams.spawn(self.edge.bridge.tell("threads", m.TurnAbandon(token)))
        self.abandoning[thread_id] = task
        task.add_done_callback(lambda done: self.abandoning.get(thread_id) is done and self.abandoning.pop(thread_id))

    async def _abandoned_first(self, thread_id: str) -> None:
        """A send right after a refused one (the client's retry) must not overtake the
        refused turn's TurnAbandon: its TurnBegin would take the undone message into the
        history it sends upstream. A tell returns once the store has the message."""
        if (pending := self.abandoning.get(thread_id)) is not None:
            await asyncio.wait([pending], timeout=ABANDON_WAIT_S)  # its failure: logged by spawn

    async def _ask(self, msg):
        """The store's answer, or the error response to give. A TurnBegin the store may do
        after this request stopped waiting is undone (`_abandon`)."""
        try:
            return await self.edge.bridge.ask("threads", msg, timeout=5.0)
        except BaseException as exc:
            if isinstance(msg, m.TurnBegin) and isinstance(exc, (BridgeTimeout, asyncio.CancelledError)):
                self._abandon(msg.thread_id, msg.token)
            if not isinstance(exc, BridgeError):
                raise
            if exc.code == "thread_not_found":
                return error_response(404, "thread_not_found", str(exc))
            if exc.code == "thread_too_long":
                return error_response(413, "thread_too_long", str(exc))
            if exc.code == "unencodable":  # edge/body_limits.py should have refused it
                log.error("thread store not asked: %s", exc)
                return error_response(422, "invalid_request", f"the request cannot be stored: {exc}")
            return error_response(503, "threads_unavailable", f"the thread store did not answer: {exc}")


def _text(admission: Admission) -> str:
    return "".join(e["delta"] for e in admission.received() if e.get("type") == ev.DELTA)


def routes(edge: Edge) -> list[Route]:
    threads = ThreadRoutes(edge)
    return [
        Route("/api/threads", threads.create, methods=["POST"]),
        Route("/api/threads/{thread_id}/messages", threads.send, methods=["POST"]),
        Route("/api/threads/{thread_id}/messages", threads.read, methods=["GET"]),
    ]
