"""Cancel and resume from any edge worker (SLUICE_WORKERS=N > 1, issue 13).

A client's stream lives in the worker that admitted it (its flight, its queue, its parked
state, its record), and the kernel picks the worker of every new connection. So
`POST /api/chat/{request_id}/cancel` and `GET /api/chat/{request_id}/events` often land on
a worker that does not hold the request. They are relayed to the one that does:

- Each worker's request ids name it: `w<slot>-<32 hex>` (`new_request_id`, `owner_of`).
  A replacement keeps its slot, so the id of a dead worker's request leads to the
  replacement, which answers 404 like for any unknown id: the request died with its worker.
- Each worker also serves its app on a Unix socket of its own, `<dir>/<slot>.sock`, in a
  directory only the gateway's user may enter (run.py makes it 0700, edge/worker_set.py).
- A worker that gets a cancel or resume for another slot's id (after checking the caller's
  key, as for any request) sends the same request, with the caller's own headers, to the
  owner's socket and streams the owner's answer back (`Relay`, an ASGI app): status,
  headers and body as the owner wrote them (a resumed SSE stream included), plus
  `X-Sluice-Relayed-To: <slot>`. The owner decides everything with its usual code: it
  authenticates the forwarded key again, and another key's request, an unknown id or an
  expired one is its 404, a live first connection its 409.

Nothing is trusted from the relaying worker: the owner sees a client like any other, so the
socket grants no more than the public port does, and it is out of reach of other local
users and of anything that can only reach TCP (docs/security.md). The one-worker path is
untouched (no relay object, no prefix, no extra step). Tokens of a relayed resume cross
one local socket more (the owner writes them, this worker copies them); a resume is rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket

import httpcore

from protocols import events as ev
from protocols.sse import SSEParser, frame

log = logging.getLogger("sluice.edge.relay")

RELAYED = b"x-sluice-relayed"  # on the request to the owner: answer it, never relay it again
RELAYED_TO = b"x-sluice-relayed-to"  # on the answer: the slot of the worker that owns the request
_ID = re.compile(r"w([1-9][0-9]{0,3})-[0-9a-f]{32}")
# Not passed on: hop-by-hop (each connection its own), the ones httpcore sets itself,
# and the owner's X-Sluice-Worker (this worker's own header names who answered), Date, Server.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection", b"trailer"}
_REQUEST_DROP = _HOP | {b"host", b"content-length", RELAYED}
_RESPONSE_DROP = _HOP | {b"x-sluice-worker", b"date", b"server"}  # uvicorn adds its own
CONNECT_TIMEOUT_S = 5.0


def socket_path(directory: str, slot: int) -> str:
    return os.path.join(directory, f"{slot}.sock")


def new_request_id(slot: int) -> str:
    """128 random bits, as with one worker (edge/streams.py), named after the worker."""
    return f"w{slot}-{secrets.token_hex(16)}"


def owner_of(request_id: str) -> int | None:
    """The slot a request id names (None: not a worker's id)."""
    found = _ID.fullmatch(request_id)
    return int(found.group(1)) if found else None


class WorkerRelay:
    """This worker's side: its slot, the workers' socket directory, how many there are."""

    def __init__(self, slot: int, count: int, directory: str, keepalive_s: float):
        self.slot, self.count, self.directory = slot, count, directory
        # The owner writes at least a keepalive this often on a stream; silence far beyond
        # it means the owner is stuck, and the relay gives up rather than hang.
        self.read_timeout_s = 4 * keepalive_s + 10.0

    def new_request_id(self) -> str:
        return new_request_id(self.slot)

    def bind(self) -> socket.socket:
        """This worker's Unix socket (a dead predecessor's file is replaced)."""
        path = socket_path(self.directory, self.slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock

    def route(self, scope, request_id: str, shutting_down: asyncio.Event) -> Relay | None:
        """The Relay to the worker owning `request_id`, or None to answer here: the id is
        this worker's, no worker's, or names a slot that does not exist; or the request was
        relayed to us already (a relayed request is never relayed again)."""
        owner = owner_of(request_id)
        if owner is None or owner == self.slot or not 1 <= owner <= self.count:
            return None
        if any(name == RELAYED for name, _ in scope["headers"]):
            return None
        return Relay(self, owner, request_id, shutting_down)


class Relay:
    """An ASGI app: the request as this worker received it, sent to the owner's socket, and
    the owner's answer streamed back until it ends, the client leaves, or this worker shuts
    down (then the relay is cut, the owner sees its client go: a resumed stream is parked
    again and can be resumed once more)."""

    def __init__(self, relay: WorkerRelay, owner: int, request_id: str, shutting_down: asyncio.Event):
        self.relay, self.owner, self.request_id, self.shutting_down = relay, owner, request_id, shutting_down

    async def __call__(self, scope, receive, send) -> None:
        path = socket_path(self.relay.directory, self.owner)
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _REQUEST_DROP]
        headers += [(b"host", b"sluice-worker"), (RELAYED, str(self.relay.slot).encode())]
        timeout = {"connect": CONNECT_TIMEOUT_S, "read": self.relay.read_timeout_s, "write": 10.0, "pool": 10.0}
        async with httpcore.AsyncConnectionPool(uds=path) as pool:
            try:
                cm = pool.stream(
                    scope["method"],
                    httpcore.URL(scheme=b"http", host=b"sluice-worker", port=None, target=target),
                    headers=headers,
                    content=b"",
                    extensions={"timeout": timeout},
                )
                response = await cm.__aenter__()
            except (
                httpcore.ConnectError,
                httpcore.TimeoutException,
                httpcore.NetworkError,
                httpcore.RemoteProtocolError,
            ) as exc:
                log.info("relay of %s to worker %d failed: %r", self.request_id, self.owner, exc)
                await self._gone(send)
                return
            try:
                await self._copy(response, receive, send)
            finally:
                await cm.__aexit__(None, None, None)

    async def _copy(self, response, receive, send) -> None:
        kept = [(k, v) for k, v in response.headers if k.lower() not in _RESPONSE_DROP]
        kept.append((RELAYED_TO, str(self.owner).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": kept})
        copying = asyncio.ensure_future(self._body(response, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        stopping = asyncio.ensure_future(self.shutting_down.wait())
        try:
            await asyncio.wait({copying, gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (copying, gone, stopping):
                task.cancel()
            await asyncio.gather(copying, gone, stopping, return_exceptions=True)
        # Whole, or cut short (the client left, this worker stops, the owner is stuck): the
        # body ends here; a stream without its terminal event is what a client resumes. (An
        # owner that died has had its terminal event written by `_body`.)
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _body(self, response, send) -> None:
        stream = _Terminal() if _is_sse(response) else None
        try:
            async for chunk in response.aiter_stream():
                if stream is not None:
                    stream.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpcore.TimeoutException as exc:
            log.info("relay of %s from worker %d cut: %r", self.request_id, self.owner, exc)
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            log.info("relay of %s from worker %d cut: %r", self.request_id, self.owner, exc)
            # The owner's socket broke mid-stream: its worker died, and the stream with it
            # (a resume would find no such id). Its client hears that as the one terminal
            # event its stream owes it, as a Pool's death reaches a client in-band; a clean
            # end without one would look like a stream to resume, or to a careless client,
            # like a whole answer.
            if stream is not None and not stream.ended:
                lost = ev.error(
                    "worker_lost", f"the edge worker that held this stream ({self.owner}) is gone; it ended with it"
                )
                await send({"type": "http.response.body", "body": frame(lost), "more_body": True})

    async def _gone(self, send) -> None:
        """The owner's socket does not answer: that worker died (or is being replaced), and
        its requests with it. As for any unknown id: 404."""
        body = json.dumps(
            {
                "error": {
                    "code": "not_found",
                    "message": f"no open stream with request id {self.request_id!r}: the edge worker "
                    f"that served it ({self.owner}) is gone, and its streams ended with it",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _is_sse(response) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in response.headers)


class _Terminal:
    """Whether the relayed SSE stream has carried its terminal event (done or error)."""

    def __init__(self):
        self.parser, self.ended = SSEParser(), False

    def feed(self, chunk: bytes) -> None:
        for item in self.parser.feed(chunk):
            if item.event == "message" and item.data.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.ended = self.ended or json.loads(item.data).get("type") in ev.TERMINAL


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
