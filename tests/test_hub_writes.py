"""The hub's writes to an edge (actors/hub.py): a lone frame leaves on the next turn of the
loop; frames that follow within FLUSH_GAP_S of a write share the next one, in order; a
stream's frames up to its first delta (the client's TTFT) do not wait for the gap."""

from __future__ import annotations

import asyncio

import pytest

from actors import hub as hub_module
from actors.hub import EdgeConnection, StreamHub
from protocols import auth
from protocols import events as ev
from protocols import messages as m

pytestmark = pytest.mark.unit


class FakeTransport:
    def get_write_buffer_size(self) -> int:
        return 0


class RecordingWriter:
    def __init__(self):
        self.writes: list[bytes] = []
        self.transport = FakeTransport()
        self.wrote = asyncio.Event()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.wrote.set()


async def next_write(writer: RecordingWriter) -> bytes:
    writer.wrote.clear()
    await asyncio.wait_for(writer.wrote.wait(), 5)
    return writer.writes[-1]


def test_a_lone_frame_leaves_at_once_and_a_burst_shares_one_write(monkeypatch):
    # A gap far longer than any stall of a loaded machine between two lines below.
    monkeypatch.setattr(hub_module, "FLUSH_GAP_S", 0.3)

    async def main():
        writer = RecordingWriter()
        conn = EdgeConnection(None, None, writer)
        conn.send_encoded(b"a")
        await asyncio.sleep(0)  # one turn of the loop
        assert writer.writes == [b"a"]
        for frame in (b"b", b"c", b"d"):  # right after a write: these wait for the gap
            conn.send_encoded(frame)
            await asyncio.sleep(0)
        assert writer.writes == [b"a"]
        assert await next_write(writer) == b"bcd"
        await asyncio.sleep(hub_module.FLUSH_GAP_S)  # a quiet gap: the next frame goes at once
        conn.send_encoded(b"e")
        await asyncio.sleep(0)
        assert writer.writes == [b"a", b"bcd", b"e"]

    asyncio.run(main())


def test_an_urgent_frame_does_not_wait_for_the_gap_and_keeps_the_order(monkeypatch):
    monkeypatch.setattr(hub_module, "FLUSH_GAP_S", 0.3)

    async def main():
        writer = RecordingWriter()
        conn = EdgeConnection(None, None, writer)
        conn.send_encoded(b"a")
        await asyncio.sleep(0)
        conn.send_encoded(b"b")  # within the gap: waits
        await asyncio.sleep(0)
        assert writer.writes == [b"a"]
        conn.send_encoded(b"c", urgent=True)  # goes now, with what waited before it
        conn.send_encoded(b"d")  # queued in the same turn: rides along
        await asyncio.sleep(0)
        assert writer.writes == [b"a", b"bcd"]
        conn.send_encoded(b"e")  # right after that write: the gap again
        await asyncio.sleep(0)
        assert writer.writes == [b"a", b"bcd"]
        assert await next_write(writer) == b"e"
        await asyncio.sleep(hub_module.FLUSH_GAP_S + 0.05)  # the cancelled timer wrote nothing more
        assert writer.writes == [b"a", b"bcd", b"e"]

    asyncio.run(main())


class RecordingPeer:
    edge_id = "edge-1"

    def __init__(self):
        self.frames: list[tuple[list[str], bool]] = []

    def send_encoded(self, data: bytes, urgent: bool = False) -> None:
        msg = m.decode(data)
        self.frames.append(([event["type"] for event in msg.events], urgent))


def test_a_streams_frames_are_urgent_up_to_its_first_delta():
    secret = auth.new_secret()
    hub = StreamHub(secret)
    peer = RecordingPeer()
    hub.on_edge_message(peer, m.Subscribe("s-1", auth.ticket(secret, "s-1", "edge-1")))
    hub.mark_open("s-1")
    hub.publish("s-1", [ev.started(1.0, 0.0, 1)])
    hub.publish("s-1", [ev.meta(role="assistant")])  # a provider's role chunk: no text yet
    hub.publish("s-1", [ev.delta("Hel")])  # the first token: the TTFT
    hub.publish("s-1", [ev.delta("lo")])
    hub.publish("s-1", [ev.done("stop")])
    assert peer.frames == [
        (["started"], True),
        (["meta"], True),
        (["delta"], True),
        (["delta"], False),
        (["done"], False),
    ]


class BehindTransport:
    def __init__(self):
        self.size = 0

    def get_write_buffer_size(self) -> int:
        return self.size


class ClosingWriter(RecordingWriter):
    def __init__(self):
        super().__init__()
        self.transport = BehindTransport()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_an_edge_behind_by_a_burst_keeps_its_connection_and_one_that_stays_behind_is_cut():
    """Frames of megabytes for a few streams at once put an edge that keeps up 8 MB behind
    for a moment: it was cut off at once (every stream of that edge on the Pool ended
    hub_disconnected). Now only an edge that stays behind SLOW_EDGE_S, or gets
    HARD_MAX_BUFFERED_BYTES behind, is."""

    async def main():
        writer = ClosingWriter()
        conn = EdgeConnection(None, None, writer)
        writer.transport.size = hub_module.MAX_BUFFERED_BYTES + 1  # a burst is on its way
        conn._flush_handle, conn._pending = None, [b"big"]
        conn._flush()
        assert not writer.closed and writer.writes == [b"big"]
        writer.transport.size = 0  # it drained: the clock starts again next time
        conn._pending = [b"next"]
        conn._flush()
        assert conn._behind_since is None and not writer.closed
        writer.transport.size = hub_module.MAX_BUFFERED_BYTES + 1
        conn._pending = [b"more"]
        conn._flush()
        conn._behind_since -= hub_module.SLOW_EDGE_S + 0.1  # ... and it stayed behind since
        conn._pending = [b"late"]
        conn._flush()
        assert writer.closed and writer.writes[-1] == b"more"

        far = ClosingWriter()
        conn = EdgeConnection(None, None, far)
        far.transport.size = hub_module.HARD_MAX_BUFFERED_BYTES + 1
        conn._pending = [b"x"]
        conn._flush()
        assert far.closed and far.writes == []

    asyncio.run(main())
