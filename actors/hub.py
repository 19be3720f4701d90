"""The stream hub: the data plane from the Pool to the edge processes.

Tokens never travel as Thespian messages (a host carries ~1,000 of those a second; see
docs/architecture.md). Each edge process keeps one TCP connection to the hub, on the
actor system's interface. The connection starts with a challenge the edge answers with an
HMAC of the cluster secret (protocols/hub_hello.py): until that matches, the hub reads
only that small fixed-size answer and parses nothing, and a wrong or late answer closes
the connection. Then the edge sends `Subscribe`/`Unsubscribe`; the hub sends `StreamData`
frames (protocols/messages.py, msgpack, back to back on the socket). A `Subscribe` is
served only with the Coalescer's ticket for the edge id this connection authenticated as
(`protocols.auth.ticket_ok`); otherwise the answer is `SubscribeRefused` and nothing of
the stream. A stream's events
are kept from its first to its last (the replay buffer), so a subscriber that arrives
late gets everything so far in one frame, then the rest live: every subscriber sees the
same events in the same order. A finished stream lingers `linger_s` for late
subscribers, then is dropped. A stream subscribed to but never opened (an actor lost a
message) ends with an error after `orphan_s`, so no client waits forever.

Runs on the Pool's asyncio loop; single-threaded by construction.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgpack

from protocols import auth, hub_hello, trace
from protocols import events as ev
from protocols import messages as m

log = logging.getLogger("sluice.hub")

MAX_BUFFERED_BYTES = 8 * 1024 * 1024  # a slower edge than this is cut off, not waited for
# At most one write per edge per FLUSH_GAP_S: a lone token leaves at once, but under load
# (hundreds of tokens a second) the frames of a couple of milliseconds share one send,
# which on loopback TCP costs the sender and the woken edge far more than the bytes do.
FLUSH_GAP_S = 0.002
HANDSHAKE_TIMEOUT_S = 5.0  # a peer that has not answered the challenge by then is cut off
MAX_HANDSHAKES = 64  # connections still in their handshake; more are closed at once


@dataclass
class HubStream:
    stream_id: str
    created_at: float
    events: list = field(default_factory=list)
    subscribers: set = field(default_factory=set)
    finished_at: float | None = None
    opened: bool = False  # the Pool started (or failed) the upstream call for it


class EdgeConnection:
    def __init__(self, hub: StreamHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.hub, self.reader, self.writer = hub, reader, writer
        self.edge_id: str | None = None  # set once the handshake proved it
        self.streams: set[str] = set()
        self._pending: list[bytes] = []
        self._flushed_at = 0.0

    def send(self, msg) -> None:
        self.send_encoded(m.encode(msg))

    def send_encoded(self, data: bytes) -> None:
        """Queue a frame; it leaves with everything else queued until the next write:
        at the end of this turn of the loop, or FLUSH_GAP_S after the previous write."""
        if not self._pending:
            loop = asyncio.get_running_loop()
            due = self._flushed_at + FLUSH_GAP_S
            if due <= loop.time():
                loop.call_soon(self._flush)
            else:
                loop.call_at(due, self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        self._flushed_at = asyncio.get_running_loop().time()
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            log.warning("edge connection too slow, closing it")
            self.writer.close()
            return
        self.writer.write(data)

    async def handshake(self, secret: bytes) -> str | None:
        """Challenge the peer; -> the edge id it proved, or None. Reads at most
        1 + MAX_EDGE_ID_BYTES + MAC_BYTES bytes, and parses only the length byte."""
        nonce = hub_hello.new_nonce()
        self.writer.write(nonce)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                size = (await self.reader.readexactly(1))[0]
                if not 1 <= size <= hub_hello.MAX_EDGE_ID_BYTES:
                    return None
                rest = await self.reader.readexactly(size + auth.MAC_BYTES)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None
        return hub_hello.check(secret, nonce, rest[:size], rest[size:])

    async def serve(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 20)
        try:
            while data := await self.reader.read(65536):
                unpacker.feed(data)
                for raw in unpacker:
                    self.hub.on_edge_message(self, m.from_wire(raw))
        except (ConnectionError, msgpack.ExtraData, ValueError) as exc:
            log.info("edge connection closed: %s", exc)
        finally:
            self.hub.drop(self)
            self.writer.close()


class StreamHub:
    """`secret` is the cluster secret (actors/secret.py): it checks the edges' handshakes
    and the Coalescer's tickets."""

    def __init__(self, secret: bytes, linger_s: float = 30.0, orphan_s: float = 120.0):
        if not secret:
            raise ValueError("the stream hub needs the cluster secret")
        self.secret = secret
        self.linger_s, self.orphan_s = linger_s, orphan_s
        self.handshaking = 0  # connections not yet authenticated
        self.refused_handshakes = 0
        self.refused_subscribes = 0
        self.streams: dict[str, HubStream] = {}
        self.connections: set[EdgeConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str) -> int:
        self._server = await asyncio.start_server(self._accept, host, 0)
        self._sweeper = asyncio.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for conn in list(self.connections):
            conn.writer.close()
        tasks = list(self._tasks) + ([self._sweeper] if self._sweeper else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader, writer) -> None:
        if self.handshaking >= MAX_HANDSHAKES:  # someone opens connections and never answers
            writer.close()
            return
        conn = EdgeConnection(self, reader, writer)
        task = asyncio.current_task()
        self._tasks.add(task)
        self.handshaking += 1
        try:
            try:
                conn.edge_id = await conn.handshake(self.secret)
            finally:
                self.handshaking -= 1
            if conn.edge_id is None:
                self.refused_handshakes += 1
                log.warning("hub connection from %s refused: no valid answer to the challenge", writer.get_extra_info("peername"))
                return
            self.connections.add(conn)
            await conn.serve()
        finally:
            self._tasks.discard(task)
            writer.close()

    # --- publishing ---------------------------------------------------------------------
    def publish(self, stream_id: str, events: list[dict]) -> None:
        trace.stamp("hub_publish", "pool", stream_id, events)
        stream = self._stream(stream_id)
        if stream.finished_at is not None or not events:
            return
        seq = len(stream.events)
        stream.events.extend(events)
        if ev.is_terminal(events[-1]):
            stream.finished_at = time.monotonic()
        if stream.subscribers:
            frame = m.encode(m.StreamData(stream_id, seq, events))
            for conn in stream.subscribers:
                conn.send_encoded(frame)

    def mark_open(self, stream_id: str) -> None:
        self._stream(stream_id).opened = True

    def is_finished(self, stream_id: str) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and stream.finished_at is not None

    def subscriber_count(self, stream_id: str) -> int:
        stream = self.streams.get(stream_id)
        return len(stream.subscribers) if stream else 0

    # --- subscriptions ------------------------------------------------------------------
    def on_edge_message(self, conn: EdgeConnection, msg) -> None:
        if isinstance(msg, m.Subscribe):
            if not auth.ticket_ok(self.secret, msg.stream_id, conn.edge_id, msg.ticket):
                self.refused_subscribes += 1
                log.warning("edge %r refused stream %r: no valid ticket", conn.edge_id, msg.stream_id)
                conn.send(m.SubscribeRefused(msg.stream_id, "forbidden", "this edge was not admitted to this stream"))
                return
            stream = self._stream(msg.stream_id)
            stream.subscribers.add(conn)
            conn.streams.add(msg.stream_id)
            if stream.events:
                conn.send(m.StreamData(msg.stream_id, 0, list(stream.events)))
        elif isinstance(msg, m.Unsubscribe):
            stream = self.streams.get(msg.stream_id)
            if stream:
                stream.subscribers.discard(conn)
            conn.streams.discard(msg.stream_id)
        else:
            reason = msg.reason if isinstance(msg, m.Invalid) else f"unexpected {type(msg).__name__}"
            conn.send(m.ErrorReply("bad_message", reason))

    def drop(self, conn: EdgeConnection) -> None:
        self.connections.discard(conn)
        for stream_id in conn.streams:
            stream = self.streams.get(stream_id)
            if stream:
                stream.subscribers.discard(conn)
        conn.streams.clear()

    def _stream(self, stream_id: str) -> HubStream:
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = HubStream(stream_id, time.monotonic())
        return stream

    async def _sweep(self) -> None:
        """Drop finished streams after their linger; end orphans with an error."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for stream in list(self.streams.values()):
                if stream.finished_at is not None and now - stream.finished_at > self.linger_s:
                    del self.streams[stream.stream_id]
                elif not stream.opened and stream.finished_at is None and now - stream.created_at > self.orphan_s:
                    self.publish(stream.stream_id, [ev.error("stream_not_started", "the upstream call never started")])

    def state(self) -> dict:
        return {
            "edge_connections": len(self.connections),
            "handshaking": self.handshaking,
            "refused_handshakes": self.refused_handshakes,
            "refused_subscribes": self.refused_subscribes,
            "streams": len(self.streams),
            "open_streams": sum(1 for s in self.streams.values() if s.finished_at is None),
        }
