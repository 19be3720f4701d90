"""The hub's writes to an edge (actors/hub.py): a lone frame leaves on the next turn of the
loop; frames that follow within FLUSH_GAP_S of a write share the next one, in order."""

from __future__ import annotations

import asyncio

import pytest

from actors import hub as hub_module
from actors.hub import EdgeConnection

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
