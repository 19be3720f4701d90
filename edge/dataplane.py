"""The edge's end of the data plane: one TCP connection to each Pool's stream hub.

With several Pools (SLUICE_POOLS) every Pool has its own hub; `HubClients` keeps one
`HubClient` per Pool role, made on first use, and a stream is subscribed at the hub the
Coalescer's `Admitted.hub` names. A Pool that dies ends only the streams of its own hub.

Each connection starts with the hub's challenge, which the client answers with its edge id
and an HMAC of the cluster secret (protocols/hub_hello.py); the hub serves nothing before.

`HubClient.subscribe(stream_id, ticket, on_events)` asks the hub for a stream, showing the
ticket the Coalescer gave this edge with `Admitted`; every `StreamData`
frame for it is handed to `on_events(seq, events)` on the event loop, the first frame
being the replay of all the stream produced so far (seq 0). `seq` is the index of the
frame's first event in the stream: frames of an earlier subscription to the same stream
may still be on the wire when a new one starts, and the listener uses `seq` to drop what
it already has (see edge/streams.py). A lost connection ends every stream with an error
event given with seq None ("append"), and so does a subscription the hub refuses
(`SubscribeRefused`: the ticket does not match). If the connection drops (the Pool was
restarted), every stream subscribed through it ends with an error event, and the next
subscribe connects again to wherever the directory says the hub now is.

A stream may have several listeners on one edge (two local flights that the Coalescer
joined to one stream, e.g. while coalescing was being switched back on): each subscribe
asks the hub for the replay again (the listeners drop by `seq` what they have), and the
hub hears `Unsubscribe` only when the last listener of the stream leaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgpack

from edge.listeners import Listeners
from protocols import events as ev
from protocols import hub_hello, roles, trace
from protocols import messages as m

log = logging.getLogger("sluice.edge.dataplane")

HANDSHAKE_TIMEOUT_S = 5.0


def hub_lost() -> dict:
    """The error event every stream of a lost hub connection ends with (seq None), here and
    in the simulator's edge (sim/harness.py). A new dict each time: the edge numbers the
    events it hands a client in place (edge/admission.py `EVENT_ID`)."""
    return ev.error("hub_disconnected", "the stream hub went away mid-stream")


class HubClient:
    """`secret`: the cluster secret; `edge_id`: this edge process's id, the one its
    Submits carry (the Coalescer's tickets name it)."""

    def __init__(self, locate: Callable[[], Awaitable[tuple[str, int]]], secret: bytes, edge_id: str):
        hub_hello.encode_edge_id(edge_id)  # a bad edge id fails here, not at the first stream
        self._locate = locate  # -> (host, port) of the hub, from the actor directory
        self._secret, self._edge_id = secret, edge_id
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting = asyncio.Lock()
        self._listeners: Listeners[Callable[[int | None, list[dict]], None]] = Listeners()

    async def subscribe(self, stream_id: str, ticket: str, on_events: Callable[[int | None, list[dict]], None]) -> None:
        trace.stamp("subscribe", "edge", stream_id)
        await self._ensure_connected()
        self._listeners.add(stream_id, on_events)
        self._writer.write(m.encode(m.Subscribe(stream_id, ticket)))

    def unsubscribe(self, stream_id: str, on_events: Callable[[int | None, list[dict]], None]) -> None:
        if not self._listeners.remove(stream_id, on_events):
            return  # not listening, or another local flight still listens to this stream
        if self._writer and not self._writer.is_closing():
            self._writer.write(m.encode(m.Unsubscribe(stream_id)))

    async def close(self) -> None:
        if self._writer:
            self._writer.close()
        if self._reader_task:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)

    async def _ensure_connected(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            return
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return
            host, port = await self._locate()
            reader, writer = await asyncio.open_connection(host, port)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    nonce = await reader.readexactly(hub_hello.NONCE_BYTES)
            except (TimeoutError, asyncio.IncompleteReadError) as exc:
                writer.close()
                raise ConnectionError(f"the stream hub sent no challenge: {exc!r}") from None
            # The hub closes the connection if the answer is wrong (another secret): then
            # every stream subscribed on it ends with hub_disconnected, like any lost hub.
            writer.write(hub_hello.answer(self._secret, nonce, self._edge_id))
            sock = writer.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 << 20)
        try:
            while data := await reader.read(65536):
                unpacker.feed(data)
                for raw in unpacker:
                    msg = m.from_wire(raw)
                    if isinstance(msg, m.StreamData):
                        trace.stamp("hub_rx", "edge", msg.stream_id, msg.events)
                        for listener in self._listeners.of(msg.stream_id):
                            listener(msg.seq, msg.events)
                    elif isinstance(msg, m.SubscribeRefused):
                        log.error("the hub refused stream %s: %s", msg.stream_id, msg.message)
                        for listener in self._listeners.pop(msg.stream_id):
                            listener(None, [ev.error(msg.code, f"the stream hub refused this stream: {msg.message}")])
                    else:
                        log.warning("hub sent %s", msg)
        except (ConnectionError, ValueError) as exc:
            log.warning("hub connection failed: %s", exc)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            lost = self._listeners.pop_all()
            for listeners in lost.values():
                for listener in listeners:
                    listener(None, [hub_lost()])


class HubClients:
    """One `HubClient` per Pool (role -> client). `locate(role)` -> (host, port) of that
    Pool's hub, from the actor directory; `hub` "" is "pool" (Pool 0)."""

    def __init__(self, locate: Callable[[str], Awaitable[tuple[str, int]]], secret: bytes, edge_id: str):
        hub_hello.encode_edge_id(edge_id)
        self._locate, self._secret, self._edge_id = locate, secret, edge_id
        self.clients: dict[str, HubClient] = {}

    def client(self, hub: str) -> HubClient:
        role = hub or roles.POOL
        client = self.clients.get(role)
        if client is None:
            client = HubClient(lambda: self._locate(role), self._secret, self._edge_id)
            self.clients[role] = client
        return client

    async def subscribe(
        self, stream_id: str, ticket: str, on_events: Callable[[int | None, list[dict]], None], hub: str = ""
    ) -> None:
        await self.client(hub).subscribe(stream_id, ticket, on_events)

    def unsubscribe(self, stream_id: str, on_events: Callable[[int | None, list[dict]], None], hub: str = "") -> None:
        client = self.clients.get(hub or roles.POOL)
        if client is not None:
            client.unsubscribe(stream_id, on_events)

    async def close(self) -> None:
        for client in list(self.clients.values()):
            await client.close()
