"""Server-sent events framing (https://html.spec.whatwg.org/#server-sent-events).

`frame` turns one event into bytes; `SSEParser` turns bytes back into (event, data) pairs
and does not care where the chunks were split. Used by the edge, by the provider adapters
whose wire format is SSE, and by tests and benchmarks that read sluice's own streams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PING = b"event: ping\ndata: {}\n\n"


# `json.dumps` with these arguments builds a new JSONEncoder on every call, and the edge
# frames every token of every stream: the encoder is made once.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def frame(data: dict | str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    if not isinstance(data, str):
        # Compact JSON holds no line break (a CR or LF inside a string is escaped): one
        # data line, without splitting the payload into lines first.
        return (head + "data: " + _ENCODE(data) + "\n\n").encode()
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (head + lines + "\n").encode()


@dataclass
class SSEEvent:
    event: str  # "message" when the stream named none
    data: str
    id: str | None = None


@dataclass
class SSEParser:
    """Incremental parser: feed bytes, get complete events."""

    _buffer: bytes = b""
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None
    _data_size: int = 0  # characters in `_data`: a reader bounds a half-built event by it

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk if self._buffer else bytes(chunk)
        out: list[SSEEvent] = []
        start = 0
        while True:
            end, after = _line_end(buffer, start)
            if end < 0:
                break
            event = self._line(buffer[start:end].decode("utf-8", errors="replace"))
            start = after
            if event is not None:
                out.append(event)
        self._buffer = buffer[start:]
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data and not self._event:
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._data_size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    @property
    def pending_size(self) -> int:
        """How much is held for the event not yet complete: its unfinished line and its data
        lines so far (a stream whose events never end must not grow without bound)."""
        return len(self._buffer) + self._data_size

    @property
    def pending(self) -> bool:
        """True when bytes or a half-built event are left over (a truncated stream)."""
        return bool(self._buffer.strip() or self._data)


def _line_end(buffer: bytes, start: int) -> tuple[int, int]:
    """(end of the first line at or after start, start of the next), or (-1, -1) when no
    complete line is buffered. CRLF, LF and CR all end a line; a trailing CR waits for
    the next byte, which may be the LF of a CRLF split across chunks."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
    if cr >= 0:
        if cr + 1 == len(buffer):
            return -1, -1
        return cr, cr + (2 if buffer[cr + 1] == 0x0A else 1)
    if lf >= 0:
        return lf, lf + 1
    return -1, -1


def _split_line(buffer: bytes) -> tuple[bytes, bool, bytes]:
    """Split at the first CRLF, LF or CR; a lone trailing CR waits for more bytes."""
    end, after = _line_end(buffer, 0)
    if end < 0:
        return buffer, False, b""
    return buffer[:end], True, buffer[after:]
