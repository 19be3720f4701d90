"""The stream hub serves a stream only to the edge the Coalescer admitted (issue 10): a
socket that does not answer the challenge gets nothing and is closed, whatever it sends;
an edge with another secret is refused; an authenticated edge without the ticket for its
own edge id gets `SubscribeRefused` and no event; the admitted edge gets everything.
Real StreamHub and HubClient (or a raw socket) over loopback TCP, in one process."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from actors import hub as hub_module
from actors.hub import StreamHub
from edge.dataplane import HubClient
from protocols import auth, hub_hello
from protocols import events as ev
from protocols import messages as m

pytestmark = pytest.mark.unit

STREAM = "s-" + "7" * 32


async def until(predicate, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything the hub sends until it closes the connection (fails if it never does)."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            out += chunk
    return bytes(out)


class RawEdge:
    """A hand-driven hub connection: optionally answers the challenge, then sends and
    reads msgpack frames."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    @classmethod
    async def connect(cls, port: int, secret: bytes | None = None, edge_id: str = "edge-raw") -> RawEdge:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        edge = cls(reader, writer)
        if secret is not None:
            nonce = await reader.readexactly(hub_hello.NONCE_BYTES)
            writer.write(hub_hello.answer(secret, nonce, edge_id))
        return edge

    def send(self, msg) -> None:
        self.writer.write(m.encode(msg))

    async def next_message(self, timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            while True:
                for raw in self.unpacker:
                    return m.from_wire(raw)
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the hub closed the connection")
                self.unpacker.feed(data)

    def close(self) -> None:
        self.writer.close()


def hub_test(scenario):
    """Run `scenario(hub, port, secret)` against a fresh hub with a stream already under way."""

    async def main():
        secret = auth.new_secret()
        hub = StreamHub(secret)
        port = await hub.start("127.0.0.1")
        try:
            hub.mark_open(STREAM)
            hub.publish(STREAM, [ev.delta("secret answer, part one ")])
            await scenario(hub, port, secret)
        finally:
            await hub.stop()

    asyncio.run(main())


def recorder(got: list):
    def on_frame(seq, events):
        got.append((seq, events))

    return on_frame


@pytest.mark.parametrize("answer", ["none", "wrong mac"])
def test_an_unauthenticated_socket_gets_nothing_of_a_stream_and_is_closed(answer):
    async def scenario(hub, port, secret):
        # Even with the right ticket for some edge id: no valid answer to the challenge, no service.
        raw = await RawEdge.connect(port)
        if answer == "wrong mac":  # well-formed, signed with a guessed secret
            nonce = await raw.reader.readexactly(hub_hello.NONCE_BYTES)
            raw.writer.write(hub_hello.answer(b"guess", nonce, "edge-raw"))
        raw.send(m.Subscribe(STREAM, auth.ticket(secret, STREAM, "edge-raw")))
        received = await read_to_eof(raw.reader)
        raw.close()
        hub.publish(STREAM, [ev.delta("part two"), ev.done("stop")])
        challenge = 0 if answer == "wrong mac" else hub_hello.NONCE_BYTES  # read above, or here
        assert len(received) == challenge  # the challenge, and not one byte more
        assert hub.subscriber_count(STREAM) == 0 and not hub.connections
        assert hub.refused_handshakes == 1

    hub_test(scenario)


def test_a_socket_that_never_answers_is_closed_after_the_handshake_timeout(monkeypatch):
    monkeypatch.setattr(hub_module, "HANDSHAKE_TIMEOUT_S", 0.2)

    async def scenario(hub, port, secret):
        raw = await RawEdge.connect(port)
        received = await read_to_eof(raw.reader)
        raw.close()
        assert len(received) == hub_hello.NONCE_BYTES and hub.refused_handshakes == 1 and hub.handshaking == 0

    hub_test(scenario)


def test_a_client_with_another_secret_is_refused():
    async def scenario(hub, port, secret):
        async def locate():
            return "127.0.0.1", port

        impostor = HubClient(locate, auth.new_secret(), "edge-1")
        got = []
        try:
            # Even the right ticket does not help a connection that failed the handshake.
            await impostor.subscribe(STREAM, auth.ticket(secret, STREAM, "edge-1"), recorder(got))
            await until(lambda: got)
            hub.publish(STREAM, [ev.delta("part two")])
            assert got == [(None, [ev.error("hub_disconnected", "the stream hub went away mid-stream")])]
            assert hub.subscriber_count(STREAM) == 0 and not hub.connections and hub.refused_handshakes == 1
        finally:
            await impostor.close()

    hub_test(scenario)


def test_an_authenticated_edge_without_its_own_ticket_gets_no_event_of_the_stream():
    async def scenario(hub, port, secret):
        async def locate():
            return "127.0.0.1", port

        admitted, other = HubClient(locate, secret, "edge-a"), HubClient(locate, secret, "edge-b")
        got_a, got_b_stolen, got_b_none = [], [], []
        try:
            await admitted.subscribe(STREAM, auth.ticket(secret, STREAM, "edge-a"), recorder(got_a))
            # edge-b shows edge-a's ticket (copied from somewhere), then no ticket at all
            await other.subscribe(STREAM, auth.ticket(secret, STREAM, "edge-a"), recorder(got_b_stolen))
            await until(lambda: got_b_stolen)
            await other.subscribe(STREAM, "", recorder(got_b_none))
            await until(lambda: got_b_none)
            hub.publish(STREAM, [ev.delta("part two"), ev.done("stop")])
            await until(lambda: sum(len(events) for _, events in got_a) == 3)

            refused = [
                (
                    None,
                    [
                        ev.error(
                            "forbidden", "the stream hub refused this stream: this edge was not admitted to this stream"
                        )
                    ],
                )
            ]
            assert got_b_stolen == refused and got_b_none == refused
            assert [e.get("delta") for _, events in got_a for e in events] == [
                "secret answer, part one ",
                "part two",
                None,
            ]
            assert hub.subscriber_count(STREAM) == 1 and hub.refused_subscribes == 2
        finally:
            await admitted.close()
            await other.close()

    hub_test(scenario)


def test_a_refused_subscribe_sends_not_one_stream_frame_on_the_wire():
    async def scenario(hub, port, secret):
        raw = await RawEdge.connect(port, secret, "edge-b")
        try:
            raw.send(m.Subscribe(STREAM, auth.ticket(secret, STREAM, "edge-a")))
            assert await raw.next_message() == m.SubscribeRefused(
                STREAM, "forbidden", "this edge was not admitted to this stream"
            )
            hub.publish(STREAM, [ev.delta("part two")])
            # A second refusal on the same connection: anything the publish had queued for
            # this connection would arrive before it.
            raw.send(m.Subscribe(STREAM, "not a ticket"))
            assert isinstance(await raw.next_message(), m.SubscribeRefused)
            # With its own ticket the same connection is served: the handshake did work.
            raw.send(m.Subscribe(STREAM, auth.ticket(secret, STREAM, "edge-b")))
            replay = await raw.next_message()
            assert isinstance(replay, m.StreamData) and replay.seq == 0 and len(replay.events) == 2
        finally:
            raw.close()

    hub_test(scenario)


def test_a_ticket_that_is_not_ascii_is_refused_not_a_crash():
    async def scenario(hub, port, secret):
        raw = await RawEdge.connect(port, secret, "edge-b")
        try:
            raw.send(m.Subscribe(STREAM, "é" * 64))
            assert isinstance(await raw.next_message(), m.SubscribeRefused)
        finally:
            raw.close()

    hub_test(scenario)
