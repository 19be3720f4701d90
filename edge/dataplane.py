"""The edge's end of the data plane: one TCP connection to the Pool's stream hub.

`HubClient.subscribe(stream_id, on_events)` asks the hub for a stream; every `StreamData`
frame for it is handed to `on_events(seq, events)` on the event loop, the first frame
being the replay of all the stream produced so far (seq 0). `seq` is the index of the
frame's first event in the stream: frames of an earlier subscription to the same stream
may still be on the wire when a new one starts, and the listener uses `seq` to drop what
it already has (see edge/streams.py). A lost connection ends every stream with an error
event given with seq None ("append"). If the connection drops (the Pool was
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
from typing import Awaitable, Callable

import msgpack

from protocols import events as ev
from protocols import messages as m

log = logging.getLogger("sluice.edge.dataplane")


class HubClient:
    def __init__(self, locate: Callable[[], Awaitable[tuple[str, int]]]):
        self._locate = locate  # -> (host, port) of the hub, from the actor directory
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting = asyncio.Lock()
        self._listeners: dict[str, list[Callable[[int | None, list[dict]], None]]] = {}

    async def subscribe(self, stream_id: str, on_events: Callable[[int | None, list[dict]], None]) -> None:
        await self._ensure_connected()
        self._listeners.setdefault(stream_id, []).append(on_events)
        self._writer.write(m.encode(m.Subscribe(stream_id)))

    def unsubscribe(self, stream_id: str, on_events: Callable[[int | None, list[dict]], None]) -> None:
        listeners = self._listeners.get(stream_id)
        if not listeners or on_events not in listeners:
            return
        listeners.remove(on_events)
        if listeners:
            return  # another local flight still listens to this stream
        del self._listeners[stream_id]
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
                        for listener in list(self._listeners.get(msg.stream_id, ())):
                            listener(msg.seq, msg.events)
                    else:
                        log.warning("hub sent %s", msg)
        except (ConnectionError, ValueError) as exc:
            log.warning("hub connection failed: %s", exc)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            lost, self._listeners = self._listeners, {}
            for listeners in lost.values():
                for listener in listeners:
                    listener(None, [ev.error("hub_disconnected", "the stream hub went away mid-stream")])
