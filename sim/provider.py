"""The simulated LLM provider: a real HTTP server on loopback.

This module owns the *transport and timing* of the simulated upstream: one
listening port that speaks HTTP/2 with prior knowledge (h2c, via ``h2``) and
HTTP/1.1 (via ``h11``), chosen per connection by peeking at the first bytes;
pacing (time to first byte, token interval); injected failures; noticing a
client that goes away; and the /stats, /config, /healthz admin routes.  What
the replies *contain* lives in ``sim/formats.py`` (pure functions per API).

Routes: every path in ``formats.ROUTES`` (POST, completion calls: OpenAI chat and
Responses, Anthropic Messages, Perplexity Agent and Sonar, Ollama), plus
``GET /healthz``, ``GET /stats``, ``POST /stats/reset``, ``GET|POST /config``,
``POST /config/reset``.  Knobs are in ``formats.DEFAULT_KNOBS``; a prompt can
override them for one call with ``#sim key=value ...`` in its last user message.

Each /stats request record says which credential headers came with the call
(``auth``: header names, plus the scheme word of ``authorization``), never their values.

Run it: ``python -m sim.provider --host 127.0.0.1 --port 9100`` (prints
``sim provider listening on http://HOST:PORT``; SIGINT/SIGTERM -> exit 0),
in-process with ``SimulatedProvider``, or as a child with ``start_subprocess``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

from sim import formats

log = logging.getLogger("sim.provider")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 65536
H2_WINDOW = 1 << 24  # our receive window: clients may upload big prompts without stalls
H2_MAX_STREAMS = 1000
REQUEST_LOG_SIZE = 200
CANCELLATION_LOG_SIZE = 10_000
FAILED_BODIES_SIZE = (
    10_000  # bodies remembered for fail_times  # bounded so a long-running sim cannot grow without limit
)
READY_LINE = re.compile(r"sim provider listening on http://(\S+):(\d+)")


class ClientGone(Exception):
    """The client went away (stream reset, EOF, broken pipe) while we were answering."""


# ------------------------------------------------------------------ responders
#
# A responder is one HTTP response in flight, whatever the protocol.  The
# request handlers only talk to this interface, so pacing and failure logic is
# written once for HTTP/2 and HTTP/1.1.


class _Responder:
    protocol = ""

    def __init__(self) -> None:
        self.call: dict | None = None  # the /stats request record, for completion calls
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.headers_sent = False
        self.finished = False  # END_STREAM / end of message / abort already queued

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def end(self) -> None:
        raise NotImplementedError

    async def abort(self) -> None:
        raise NotImplementedError

    async def goaway(self) -> None:
        """The whole connection ends under this response (HTTP/1.1: the same as abort)."""
        await self.abort()

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await self.start(status, headers + [(b"content-length", str(len(body)).encode())])
        if body:
            await self.send(body)
        await self.end()


class _H2Stream(_Responder):
    protocol = "h2"

    def __init__(self, conn: _H2Connection, stream_id: int, headers: list) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id
        self.headers = dict(headers)
        self.request_headers = list(headers)
        self.body = bytearray()
        self.task: asyncio.Task | None = None
        self.window_open = asyncio.Event()  # set by WINDOW_UPDATE / SETTINGS

    async def start(self, status, headers):
        with self.conn.stream_errors():
            self.conn.h2.send_headers(self.stream_id, [(b":status", str(status).encode()), *headers])
        self.headers_sent = True
        await self.conn.flush()

    async def send(self, data):
        h2c = self.conn.h2
        while data:
            with self.conn.stream_errors():
                window = h2c.local_flow_control_window(self.stream_id)
            if window <= 0:
                # Respect flow control: a slow reader must slow us down, not
                # make us buffer without bound.  No await between the check and
                # clear(), so a WINDOW_UPDATE cannot slip in between.
                self.window_open.clear()
                await self.window_open.wait()
                continue
            n = min(window, len(data), h2c.max_outbound_frame_size)
            with self.conn.stream_errors():
                h2c.send_data(self.stream_id, data[:n])
            data = data[n:]
            await self.conn.flush()

    async def end(self):
        with self.conn.stream_errors():
            self.conn.h2.end_stream(self.stream_id)
        self.finished = True
        await self.conn.flush()

    async def abort(self):
        with self.conn.stream_errors():
            self.conn.h2.reset_stream(self.stream_id, error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.finished = True
        await self.conn.flush()

    async def goaway(self):
        # GOAWAY(INTERNAL_ERROR) and the socket closed: every stream of the connection is cut.
        self.finished = True
        self.conn.h2.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
        with contextlib.suppress(ClientGone):
            await self.conn.flush()
        self.conn.writer.close()


class _H1Response(_Responder):
    protocol = "http/1.1"

    def __init__(self, conn: _H1Connection) -> None:
        super().__init__()
        self.conn = conn
        self.closed = False  # we closed the socket (abort): no next request on it

    async def _write(self, event) -> None:
        try:
            data = self.conn.h11.send(event)
        except h11.LocalProtocolError as exc:
            raise ClientGone(f"h11: {exc}") from exc
        if data:
            self.conn.writer.write(data)
        try:
            await self.conn.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone("write_failed") from exc

    async def start(self, status, headers):
        reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b""
        await self._write(h11.Response(status_code=status, headers=headers, reason=reason))
        self.headers_sent = True

    async def send(self, data):
        await self._write(h11.Data(data=data))

    async def end(self):
        self.finished = True
        await self._write(h11.EndOfMessage())

    async def abort(self):
        # HTTP/1.1 has no per-request reset: closing the socket is the abort.
        # close() (not transport.abort()) so the tokens already written still arrive.
        self.finished = True
        self.closed = True
        self.conn.writer.close()


# ------------------------------------------------------------------ connections


class _H2Connection:
    def __init__(self, provider: SimulatedProvider, reader, writer, conn_id: int) -> None:
        self.provider = provider
        self.reader = reader
        self.writer = writer
        self.conn_id = conn_id
        self.h2 = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, _H2Stream] = {}
        self.last_active = time.monotonic()  # a request arrived or a response ended (idle_close_s)

    def stream_errors(self):
        """Map h2 errors on a stream the client already closed to ClientGone."""
        return _map_errors((h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError), "stream_closed")

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone("write_failed") from exc

    async def run(self, initial: bytes) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: H2_MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_WINDOW,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(H2_WINDOW - 65535)  # connection-level window
        client_left = True
        try:
            await self.flush()
            data = initial
            while True:
                if data:
                    try:
                        events = self.h2.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        await self.flush()  # h2 queued a GOAWAY explaining why
                        break
                    terminated = False
                    for event in events:
                        terminated |= self._on_event(event)
                    await self.flush()
                    if terminated:
                        break
                data = await self._read_or_idle_close()
                if not data:
                    break
        except ClientGone:
            pass
        except asyncio.CancelledError:
            client_left = False  # server shutdown, not a client cancellation
            raise
        finally:
            # Whatever ended the connection, nothing may keep generating for it.
            streams = list(self.streams.values())
            for stream in streams:
                self._stream_gone(stream, "connection_closed" if client_left else None)
            tasks = [s.task for s in streams if s.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_or_idle_close(self) -> bytes:
        """The next bytes from the client; b"" once we closed the connection for idling
        (idle_close_s, like hypercorn's keep_alive_timeout: GOAWAY, then close)."""
        reading = asyncio.ensure_future(_read(self.reader))
        try:
            while True:
                idle = self.provider.config.get("idle_close_s") or 0
                if idle <= 0:
                    timeout = None
                elif self.streams:
                    timeout = idle  # look again then: the streams may have ended
                else:
                    timeout = max(0.0, self.last_active + idle - time.monotonic())
                done, _ = await asyncio.wait({reading}, timeout=timeout)
                if done:
                    self.last_active = time.monotonic()
                    return reading.result()
                if idle > 0 and not self.streams and time.monotonic() - self.last_active >= idle:
                    self.h2.close_connection()  # GOAWAY(NO_ERROR, last stream we processed)
                    self.provider.idle_closes += 1
                    try:
                        await self.flush()
                    except ClientGone:
                        pass
                    return b""
        finally:
            if not reading.done():
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)

    def _on_event(self, event) -> bool:
        """Handle one h2 event; True when the client ended the connection."""
        if isinstance(event, h2.events.RequestReceived):
            self.streams[event.stream_id] = _H2Stream(self, event.stream_id, event.headers)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body += event.data
            # Hand the window back at once: bodies are small and fully buffered.
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.task is None:
                self._dispatch(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._stream_gone(stream, "stream_reset")
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in self.streams.values():
                    stream.window_open.set()
            elif event.stream_id in self.streams:
                self.streams[event.stream_id].window_open.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            # A new INITIAL_WINDOW_SIZE can open every stream's window.
            for stream in self.streams.values():
                stream.window_open.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return True
        return False

    def _dispatch(self, stream: _H2Stream) -> None:
        method = stream.headers.get(b":method", b"").decode()
        target = stream.headers.get(b":path", b"/").decode()
        stream.task = asyncio.create_task(
            self.provider._handle(method, target, bytes(stream.body), stream, self.conn_id)
        )

        def done(_task, stream=stream):
            self.last_active = time.monotonic()
            if self.streams.get(stream.stream_id) is stream:
                del self.streams[stream.stream_id]

        stream.task.add_done_callback(done)

    def _stream_gone(self, stream: _H2Stream, reason: str | None) -> None:
        """The client left this stream: record it now (the timestamp tests check) and stop work."""
        self.streams.pop(stream.stream_id, None)
        if stream.task is None or stream.task.done() or stream.finished:
            return
        if reason is not None and stream.call is not None:
            self.provider._finish(stream.call, "cancelled", time.time(), reason)
        stream.task.cancel()


class _H1Connection:
    def __init__(self, provider: SimulatedProvider, reader, writer, conn_id: int) -> None:
        self.provider = provider
        self.reader = reader
        self.writer = writer
        self.conn_id = conn_id
        self.h11 = h11.Connection(h11.SERVER)

    async def run(self, initial: bytes) -> None:
        self.h11.receive_data(initial)
        while True:
            request, body = await self._read_request()
            if request is None:
                return
            response = _H1Response(self)
            response.request_headers = list(request.headers)
            task = asyncio.create_task(
                self.provider._handle(request.method.decode(), request.target.decode(), body, response, self.conn_id)
            )
            try:
                client_left = await self._watch(task, response)
            finally:
                if not task.done():  # server shutdown
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if client_left or response.closed or self.h11.our_state is not h11.DONE:
                return
            try:
                self.h11.start_next_cycle()  # keep-alive: serve the next request
            except h11.LocalProtocolError:
                return

    async def _read_request(self):
        request, body = None, bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return None, None  # garbage from the client: just hang up
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:  # e.g. curl with a big body
                    self.writer.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
                self.h11.receive_data(await _read(self.reader))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed or PAUSED
                return None, None

    async def _watch(self, task: asyncio.Task, response: _H1Response) -> bool:
        """Read the socket while the handler answers, so EOF is noticed at once.

        HTTP/1.1 gives no other signal that the client left; a stalled stream
        writes nothing, so waiting for a write error would never end.
        Returns True if the client went away.
        """
        reading: asyncio.Task | None = None
        try:
            while not task.done():
                if reading is None:
                    reading = asyncio.create_task(_read(self.reader))
                await asyncio.wait({task, reading}, return_when=asyncio.FIRST_COMPLETED)
                if reading.done():
                    data = reading.result()
                    reading = None
                    if not data:
                        observed = time.time()
                        if not task.done() and not response.finished:
                            if response.call is not None:
                                self.provider._finish(response.call, "cancelled", observed, "connection_closed")
                            task.cancel()
                            await asyncio.gather(task, return_exceptions=True)
                        return True
                    self.h11.receive_data(data)  # pipelined next request; parsed next cycle
            return False
        finally:
            if reading is not None:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)


async def _read(reader: asyncio.StreamReader) -> bytes:
    """Read some bytes; a reset connection reads as EOF (b'')."""
    try:
        return await reader.read(READ_SIZE)
    except (ConnectionError, OSError):
        return b""


class _map_errors:
    """Context manager: turn the given exception types into ClientGone."""

    def __init__(self, types: tuple, reason: str) -> None:
        self.types, self.reason = types, reason

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, self.types):
            raise ClientGone(self.reason) from exc
        return False


# ------------------------------------------------------------------ the server


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _num_text(value: float) -> bytes:
    return str(int(value) if float(value).is_integer() else value).encode()


JSON_HEADERS = [(b"content-type", b"application/json")]

# Request headers that carry credentials: recorded by name only (see _auth_summary).
AUTH_HEADERS = (b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key")


def _auth_summary(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """Which credential headers a call carried, e.g. ``["authorization: Bearer"]`` or
    ``["x-api-key"]``: names and the auth scheme only, so /stats never holds a secret."""
    out = []
    for name, value in headers:
        name = name.lower()
        if name in AUTH_HEADERS:
            label = name.decode("latin-1")
            if name == b"authorization":
                scheme = value.split(b" ", 1)[0] if b" " in value.strip() else b"?"
                label += ": " + scheme.decode("latin-1")
            out.append(label)
    return sorted(out)


def _key_selected(knobs: dict, headers: list[tuple[bytes, bytes]]) -> bool:
    """Does the `fail` knob apply to this call? With ``fail_keys`` set, only to calls that
    carry one of those API keys (Bearer or x-api-key): one key of an account can fail
    while its other keys work."""
    wanted = {k.strip() for k in knobs.get("fail_keys", "").split(",") if k.strip()}
    if not wanted:
        return True
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            value = value.split(b" ", 1)[-1]
        if name in AUTH_HEADERS and value.strip().decode("latin-1") in wanted:
            return True
    return False


class SimulatedProvider:
    """The simulated upstream.  ``await start()`` binds (``.port`` is then set); ``await stop()``.

    Also usable as ``async with SimulatedProvider() as sim: ...``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.config: dict[str, Any] = dict(formats.DEFAULT_KNOBS)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._next_call_id = 1  # never reset: ids stay unique for the server's lifetime
        self._next_conn_id = 1
        self._open: dict[int, dict] = {}  # call_id -> record of calls still answering
        self.reset_stats()

    # -- lifecycle

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Cancel (not close sockets first): a closed socket would look like
        # clients leaving and be recorded as cancellations.
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SimulatedProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- stats

    def reset_stats(self) -> None:
        self.calls = 0
        self.streams_completed = 0
        self.streams_cancelled = 0
        self.streams_aborted = 0
        self.cancellations: collections.deque = collections.deque(maxlen=CANCELLATION_LOG_SIZE)
        self.requests: collections.deque = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self.idle_closes = 0  # HTTP/2 connections we closed for idling (idle_close_s)
        self._failed_bodies: dict[str, int] = {}

    def stats(self) -> dict:
        return {
            "calls": self.calls,
            # Live count, so a reset while streams are open stays consistent.
            "streams_open": len(self._open),
            "streams_completed": self.streams_completed,
            "streams_cancelled": self.streams_cancelled,
            "streams_aborted": self.streams_aborted,
            "cancellations": list(self.cancellations),
            "idle_closes": self.idle_closes,
            # Copies: records of open calls keep changing after this snapshot.
            "requests": [dict(r) for r in self.requests],
        }

    def _open_call(self, path: str, protocol: str, body: Any, conn_id: int, auth: list[str] | None = None) -> dict:
        call = {
            "call_id": self._next_call_id,
            "path": path,
            "protocol": protocol,
            "auth": auth or [],
            "body": body,
            "started_at": time.time(),
            "first_byte_at": None,
            "conn_id": conn_id,
            "status": None,
            "tokens_sent": 0,
            "outcome": None,
        }
        self._next_call_id += 1
        self.calls += 1
        self._open[call["call_id"]] = call
        self.requests.append(call)
        return call

    def _finish(self, call: dict, outcome: str, observed_at: float | None = None, reason: str | None = None) -> None:
        """Record how a call ended.  First caller wins, so racing paths cannot double-count."""
        if call["outcome"] is not None:
            return
        call["outcome"] = outcome
        self._open.pop(call["call_id"], None)
        if outcome == "completed":
            self.streams_completed += 1
        elif outcome == "aborted":
            self.streams_aborted += 1
        elif outcome == "cancelled":
            self.streams_cancelled += 1
            self.cancellations.append(
                {
                    "call_id": call["call_id"],
                    "observed_at": observed_at if observed_at is not None else time.time(),
                    "tokens_sent": call["tokens_sent"],
                    "protocol": call["protocol"],
                    "reason": reason,
                }
            )
        # "shutdown" / "error": counted in neither bucket.

    # -- connections

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that spawns our own task, so stop() can cancel and
        # await every connection (asyncio's own wrapper task is not reachable).
        task = asyncio.create_task(self._serve_connection(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve_connection(self, reader, writer) -> None:
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        try:
            # Peek until the bytes either are the h2 preface or cannot become it.
            initial = b""
            while len(initial) < len(H2_PREFACE) and H2_PREFACE.startswith(initial):
                data = await _read(reader)
                if not data:
                    return
                initial += data
            if initial.startswith(H2_PREFACE):
                await _H2Connection(self, reader, writer, conn_id).run(initial)
            else:
                await _H1Connection(self, reader, writer, conn_id).run(initial)
        except asyncio.CancelledError:
            pass  # stop(): this task is ours; end quietly
        except Exception:
            log.exception("sim provider: connection %d failed", conn_id)
        finally:
            writer.close()

    # -- requests

    async def _handle(self, method: str, target: str, body: bytes, responder: _Responder, conn_id: int) -> None:
        path = target.split("?", 1)[0]
        try:
            fmt = formats.ROUTES.get(path)
            if fmt is not None:
                if method != "POST":
                    await self._json(responder, 405, None, f"{method} not allowed on {path}")
                else:
                    await self._completion(path, fmt, body, responder, conn_id)
            elif (method, path) == ("GET", "/healthz"):
                await self._json(responder, 200, {"ok": True})
            elif (method, path) == ("GET", "/stats"):
                await self._json(responder, 200, self.stats())
            elif (method, path) == ("POST", "/stats/reset"):
                self.reset_stats()
                await self._json(responder, 200, self.stats())
            elif (method, path) == ("GET", "/config"):
                await self._json(responder, 200, self.config)
            elif (method, path) == ("POST", "/config"):
                try:
                    update = formats.validate_knobs(json.loads(body or b"{}"))
                except (ValueError, formats.KnobError) as exc:
                    await self._json(responder, 400, None, f"bad config: {exc}")
                else:
                    self.config.update(update)
                    await self._json(responder, 200, self.config)
            elif (method, path) == ("POST", "/config/reset"):
                self.config = dict(formats.DEFAULT_KNOBS)
                await self._json(responder, 200, self.config)
            else:
                await self._json(responder, 404, None, f"Invalid URL ({method} {path})")
        except ClientGone:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sim provider: %s %s failed", method, path)
            try:
                if not responder.headers_sent:
                    await self._json(responder, 500, None, "simulated provider bug (see its log)")
                elif not responder.finished:
                    await responder.abort()
            except ClientGone:
                pass

    async def _json(
        self, responder: _Responder, status: int, obj: Any, error: str = "", extra: list | None = None
    ) -> None:
        body = _json_bytes(obj) if not error else formats.openai_error(status, error)
        await responder.respond(status, JSON_HEADERS + (extra or []), body)

    async def _completion(
        self, path: str, fmt: formats.WireFormat, raw: bytes, responder: _Responder, conn_id: int
    ) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = None
        call = self._open_call(
            path,
            responder.protocol,
            body if body is not None else {"_invalid_json": raw[:2000].decode(errors="replace")},
            conn_id,
            _auth_summary(responder.request_headers),
        )
        responder.call = call
        try:
            await self._answer(call, fmt, body, responder)
        except ClientGone as exc:
            self._finish(call, "cancelled", time.time(), str(exc))
        except asyncio.CancelledError:
            self._finish(call, "shutdown")  # no-op if the connection already recorded a cancel
            raise
        except BaseException:
            self._finish(call, "error")
            raise

    def _fail_mode(self, knobs: dict, body: dict) -> str:
        """knobs["fail"], unless fail_times=N and N calls with this body already failed."""
        fail, times = knobs["fail"], knobs["fail_times"]
        if fail == "none" or not times:
            return fail
        key = json.dumps(body, sort_keys=True)
        failed = self._failed_bodies.get(key, 0)
        if failed >= times:
            return "none"
        if len(self._failed_bodies) >= FAILED_BODIES_SIZE:
            self._failed_bodies.clear()  # bounded: a long-running sim must not grow
        self._failed_bodies[key] = failed + 1
        return fail

    async def _answer(self, call: dict, fmt: formats.WireFormat, body: dict | None, responder: _Responder) -> None:
        headers = [(b"x-sim-call-id", str(call["call_id"]).encode()), (b"server", b"sluice-sim")]

        async def error(status: int, message: str, extra: list | None = None) -> None:
            call["status"] = status
            call["first_byte_at"] = time.time()
            await responder.respond(status, JSON_HEADERS + headers + (extra or []), fmt.error(status, message))
            self._finish(call, "completed")

        if body is None:
            return await error(400, "We could not parse the JSON body of your request.")
        try:
            knobs = {**self.config, **formats.parse_directive(fmt.prompt(body))}
        except formats.KnobError as exc:
            return await error(400, f"bad #sim directive: {exc}")
        fail = self._fail_mode(knobs, body) if _key_selected(knobs, responder.request_headers) else "none"
        call["fail"] = fail  # what this call was made to do: tests count attempts by it
        if fail == "429":
            # Real rate limits answer at once, before any generation.
            retry_after = knobs["retry_after_s"]
            extra = [] if retry_after is None else [(b"retry-after", _num_text(retry_after))]
            return await error(429, "Rate limit reached (simulated).", extra)
        if fail == "503":
            return await error(503, "The server is overloaded (simulated).")
        if fail == "500" or (fail == "error_mid" and not fmt.wants_stream(body)):
            # A non-streamed answer has no room for an in-band error: it fails as a whole.
            return await error(500, "The server had an error while processing your request (simulated).")
        if fail in ("json_200", "html_200"):
            # The failure's body (the API's 500 error JSON, or an HTML page) under a 200.
            call["status"] = 200
            call["first_byte_at"] = time.time()
            if fail == "json_200":
                page, kind = fmt.error(500, "The server had an error (simulated, sent as 200)."), JSON_HEADERS
            else:
                page, kind = formats.HTML_PAGE, [(b"content-type", b"text/html")]
            await responder.respond(200, kind + headers, page)
            self._finish(call, "completed")
            return
        if fail == "reset_first":
            await responder.abort()  # before any header: RST_STREAM / the socket closed
            self._finish(call, "aborted")
            return
        if fail == "stall_first":
            # No status, no byte: the connection cancels this task when the client leaves.
            await asyncio.get_running_loop().create_future()

        tokens = formats.make_tokens(fmt.conversation(body), knobs["tokens"])
        if fail == "huge_frame" and tokens:
            tokens[min(knobs["fail_after_tokens"], len(tokens) - 1)] = "x" * formats.HUGE_TOKEN_BYTES + " "
        meta = formats.Meta(call_id=call["call_id"], created=int(time.time()))
        ttft = knobs["ttft_ms"] / 1000
        interval = knobs["token_interval_ms"] / 1000
        stops_early = fail in (
            "reset_mid",
            "stall",
            "error_mid",
            "malformed",
            "cut_utf8",
            "goaway_mid",
            "keepalive_only",
            "pings_only",
        )
        sent_tokens = min(knobs["fail_after_tokens"], len(tokens)) if stops_early else len(tokens)

        # The plan: (seconds after the headers, bytes, tokens in them).
        steps: list[tuple[float, bytes, int]] = []
        if fmt.wants_stream(body):
            frames = fmt.stream(body, tokens, meta)
            headers += [(b"content-type", fmt.stream_content_type.encode()), (b"cache-control", b"no-cache")]
            head = b"".join(frames.head)
            steps.append((ttft, head, 0))
            for i in range(sent_tokens):
                steps.append((ttft + i * interval, frames.tokens[i], 1))
            if fail in ("none", "huge_frame"):
                steps.append((steps[-1][0], b"".join(frames.tail), 0))
            elif fail == "error_mid":  # the API's own in-band error, then a clean end
                steps.append((steps[-1][0], fmt.midstream_error(body, tokens, meta, sent_tokens), 0))
            elif fail == "malformed":  # then a clean end
                steps.append((steps[-1][0], formats.malformed_frame(fmt), 0))
            elif fail == "cut_utf8":  # then a clean end: the body stops inside a character
                steps.append((steps[-1][0], formats.cut_utf8_frame(fmt, body, meta), 0))
        else:
            payload = fmt.complete(body, tokens, meta)
            headers += JSON_HEADERS
            if fail in ("none", "huge_frame"):
                headers.append((b"content-length", str(len(payload)).encode()))
                # A non-streamed answer arrives when the last token would have.
                steps.append((ttft + max(len(tokens) - 1, 0) * interval, payload, len(tokens)))
            elif fail in ("truncate", "malformed", "cut_utf8", "no_done"):
                steps.append((ttft, payload[: len(payload) // 2], 0))
            # reset_mid / stall: headers, then nothing (stall) or a reset after ttft.

        if knobs["headers_ms"]:
            await asyncio.sleep(knobs["headers_ms"] / 1000)
        call["status"] = 200
        await responder.start(200, headers)  # headers at once (or after headers_ms), body after ttft
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for offset, data, ntokens in steps:
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:
                continue
            if call["first_byte_at"] is None:
                call["first_byte_at"] = time.time()
            await responder.send(data)
            call["tokens_sent"] += ntokens

        if fail == "stall":
            # Keep the stream open and silent; the connection cancels this task
            # the moment the client goes away.
            await loop.create_future()
        elif fail in ("keepalive_only", "pings_only") and fmt.wants_stream(body):
            ping = formats.ping_frame(fmt) if fail == "pings_only" else formats.keepalive_frame(fmt)
            while True:  # until the client goes away (ClientGone, or the task cancelled)
                await asyncio.sleep(max(interval, 0.01))
                await responder.send(ping)
        elif fail in ("reset_mid", "goaway_mid"):
            if not steps:
                await asyncio.sleep(ttft)
            await (responder.abort() if fail == "reset_mid" else responder.goaway())
            self._finish(call, "aborted")
        else:
            await responder.end()
            self._finish(call, "completed")


# ------------------------------------------------------------------ processes


async def _serve_until_signalled(host: str, port: int) -> None:
    provider = SimulatedProvider(host, port)
    await provider.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    # Printed only once the socket is bound and signals are handled, so a
    # parent that waits for this line can connect and signal safely.
    print(f"sim provider listening on http://{shown}:{provider.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await provider.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim.provider", description="Simulated LLM provider (HTTP/2 h2c + HTTP/1.1)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    args = parser.parse_args(argv)
    asyncio.run(_serve_until_signalled(args.host, args.port))
    return 0


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL, so a
    crashed gateway never leaves its simulated provider running (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_subprocess(port: int = 0, host: str = "127.0.0.1", timeout: float = 15.0) -> tuple[subprocess.Popen, int]:
    """Run ``python -m sim.provider`` as a child; return ``(process, port)`` once it listens.

    The CALLER MUST STOP IT: ``stop_subprocess(proc)`` (SIGINT, wait, close the
    pipe).  The child stays in our process group, so Ctrl-C reaches it too.
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.provider", "--host", host, "--port", str(port)],
        stdout=subprocess.PIPE,
        cwd=root,
        env=env,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + timeout
    out = b""
    try:
        while b"\n" not in out:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"sim provider did not report its port within {timeout}s")
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"sim provider exited early with code {proc.wait()}")
                out += chunk
        line = out.split(b"\n", 1)[0].decode(errors="replace")
        match = READY_LINE.search(line)
        if not match:
            raise RuntimeError(f"unexpected first line from sim provider: {line!r}")
        return proc, int(match.group(2))
    except BaseException:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise


def stop_subprocess(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop a child from ``start_subprocess``: SIGINT, wait (kill past the deadline); return its code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
