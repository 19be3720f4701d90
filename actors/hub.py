"""The stream hub: the data plane from the Pool to the edge processes (the network part).

Tokens never travel as Thespian messages (a host carries ~1,000 of those a second; see
docs/architecture.md). Each edge process keeps one TCP connection to the hub, on the
actor system's interface. The connection starts with a challenge the edge answers with an
HMAC of the cluster secret (protocols/hub_hello.py): until that matches, the hub reads
only that small fixed-size answer and parses nothing, and a wrong or late answer closes
the connection. Then the edge sends `Subscribe`/`Unsubscribe`; the hub sends `StreamData`
frames (protocols/messages.py, msgpack, back to back on the socket).

What the hub keeps (streams, replay buffers, subscribers, tickets, linger, orphans) is
`actors/hub_logic.py`'s `HubLogic`, which the simulation runs too; this module hosts it:
the listening socket, the handshakes, one `EdgeConnection` per edge and its write
batching, and the once-a-second sweep.

Runs on the Pool's asyncio loop; single-threaded by construction.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack

from actors.hub_logic import HubLogic, HubStream
from protocols import auth, hub_hello, trace
from protocols import messages as m
from protocols.effects import Send

log = logging.getLogger("sluice.hub")

# An edge that stays this far behind for SLOW_EDGE_S is cut off, not waited for; one that
# gets HARD_MAX_BUFFERED_BYTES behind, at once. A burst alone (a few streams each sending a
# frame of megabytes: a long token, an image, a tool call's arguments) must not cut an edge
# that is keeping up: that ended every stream of the edge on this Pool (hub_disconnected).
MAX_BUFFERED_BYTES = 8 * 1024 * 1024
SLOW_EDGE_S = 5.0
HARD_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
# At most one write per edge per FLUSH_GAP_S: a lone token leaves at once, but under load
# (hundreds of tokens a second) the frames of a couple of milliseconds share one send,
# which on loopback TCP costs the sender and the woken edge far more than the bytes do.
# Except a stream's frames up to its first delta (`urgent`): that one is the client's
# TTFT, and waiting out another stream's gap added up to 2 ms to it (docs/architecture.md).
FLUSH_GAP_S = 0.002
HANDSHAKE_TIMEOUT_S = 5.0  # a peer that has not answered the challenge by then is cut off
MAX_HANDSHAKES = 64  # connections still in their handshake; more are closed at once


class EdgeConnection:
    def __init__(self, hub: StreamHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.hub, self.reader, self.writer = hub, reader, writer
        self.edge_id: str | None = None  # set once the handshake proved it
        self._pending: list[bytes] = []
        self._flushed_at = 0.0
        self._flush_handle: asyncio.Handle | None = None  # the next write, once something waits
        self._flush_soon = False  # ... and it is at the end of this turn (not after the gap)
        self._behind_since: float | None = None  # since when the edge is MAX_BUFFERED_BYTES behind

    def send(self, msg) -> None:
        self.send_encoded(m.encode(msg))

    def send_encoded(self, data: bytes, urgent: bool = False) -> None:
        """Queue a frame; it leaves with everything else queued until the next write:
        at the end of this turn of the loop, or FLUSH_GAP_S after the previous write.
        An `urgent` frame does not wait for the gap: it and those queued before it leave
        at the end of this turn."""
        self._pending.append(data)
        if self._flush_handle is not None and (self._flush_soon or not urgent):
            return  # a write that takes this frame is already due
        if self._flush_handle is not None:  # waiting for the gap, and this one may not
            self._flush_handle.cancel()
        loop = asyncio.get_running_loop()
        due = self._flushed_at + FLUSH_GAP_S
        self._flush_soon = urgent or due <= loop.time()
        self._flush_handle = loop.call_soon(self._flush) if self._flush_soon else loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        data, self._pending = b"".join(self._pending), []
        now = self._flushed_at = asyncio.get_running_loop().time()
        if self.writer.is_closing():
            return
        behind = self.writer.transport.get_write_buffer_size()
        if behind <= MAX_BUFFERED_BYTES:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = now
        if behind > HARD_MAX_BUFFERED_BYTES or (
            self._behind_since is not None and now - self._behind_since > SLOW_EDGE_S
        ):
            log.warning("edge connection too slow (%d bytes behind), closing it", behind)
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
    and (in `HubLogic`) the Coalescer's tickets."""

    def __init__(self, secret: bytes, linger_s: float = 30.0, orphan_s: float = 120.0):
        self.logic = HubLogic(secret, linger_s, orphan_s)
        self.secret = secret
        self.handshaking = 0  # connections not yet authenticated
        self.refused_handshakes = 0
        self.connections: set[EdgeConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    @property
    def streams(self) -> dict[str, HubStream]:
        return self.logic.streams

    @property
    def refused_subscribes(self) -> int:
        return self.logic.refused_subscribes

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
                log.warning(
                    "hub connection from %s refused: no valid answer to the challenge",
                    writer.get_extra_info("peername"),
                )
                return
            self.connections.add(conn)
            await conn.serve()
        finally:
            self._tasks.discard(task)
            writer.close()

    # --- publishing ---------------------------------------------------------------------
    def publish(self, stream_id: str, events: list[dict]) -> None:
        trace.stamp("hub_publish", "pool", stream_id, events)
        stream = self.logic.streams.get(stream_id)
        urgent = stream is None or not stream.has_delta  # up to the first delta: the TTFT
        self._carry_out(self.logic.publish(stream_id, events, time.monotonic()), urgent)

    def mark_open(self, stream_id: str) -> None:
        self.logic.mark_open(stream_id, time.monotonic())

    def is_finished(self, stream_id: str) -> bool:
        return self.logic.is_finished(stream_id)

    def owner_lost(self, role: str, owner: str) -> None:
        """A Coalescer shard incarnation died: its streams that never opened end now."""
        self._carry_out(self.logic.owner_lost(role, owner, time.monotonic()), urgent=True)

    def subscriber_count(self, stream_id: str) -> int:
        return self.logic.subscriber_count(stream_id)

    # --- subscriptions ------------------------------------------------------------------
    def on_edge_message(self, conn: EdgeConnection, msg) -> None:
        effects = self.logic.handle(msg, conn, conn.edge_id, time.monotonic())
        for effect in effects:
            if isinstance(effect.msg, m.SubscribeRefused):
                log.warning("edge %r refused stream %r: no valid ticket", conn.edge_id, effect.msg.stream_id)
        self._carry_out(effects)

    def drop(self, conn: EdgeConnection) -> None:
        self.connections.discard(conn)
        self.logic.drop(conn)

    def _carry_out(self, effects: list[Send], urgent: bool = False) -> None:
        """Send each frame; a frame published to many edges is encoded once."""
        encoded: dict[int, bytes] = {}
        for effect in effects:
            data = encoded.get(id(effect.msg))
            if data is None:
                data = encoded[id(effect.msg)] = m.encode(effect.msg)
            effect.to.send_encoded(data, urgent)

    async def _sweep(self) -> None:
        """Once a second: finished streams past their linger dropped, orphans ended."""
        while True:
            await asyncio.sleep(1.0)
            self._carry_out(self.logic.sweep(time.monotonic()))

    def state(self) -> dict:
        return {
            "edge_connections": len(self.connections),
            "handshaking": self.handshaking,
            "refused_handshakes": self.refused_handshakes,
            **self.logic.state(),
        }
