"""`protocols.sse.frame`: one event's bytes, as an SSE client reads them back. A dict goes out as
compact JSON on one `data:` line (a line break inside a string is escaped, so nothing can
split it); a string payload is split into one `data:` line per line."""

from __future__ import annotations

import json

import pytest

from protocols.sse import SSEParser, frame

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "data",
    [
        {"type": "delta", "delta": "tok "},
        {"type": "delta", "delta": "two\nlines\r\nand a\rcarriage return"},
        {"type": "meta", "text": "é ü 漢字 \u2028 \u2029 \x85 \x00", "n": [1, 2.5, None, True]},
        {},
    ],
    ids=["token", "line breaks", "unicode and controls", "empty"],
)
def test_a_dict_is_one_compact_json_data_line_that_reads_back_equal(data):
    raw = frame(data)
    compact = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    assert raw == f"data: {compact}\n\n".encode()
    (event,) = SSEParser().feed(raw)
    assert event.event == "message" and json.loads(event.data) == data


def test_an_event_name_comes_first():
    assert frame({"a": 1}, "ping") == b'event: ping\ndata: {"a":1}\n\n'


def test_a_string_payload_is_split_into_data_lines():
    raw = frame("one\ntwo", "note")
    assert raw == b"event: note\ndata: one\ndata: two\n\n"
    (event,) = SSEParser().feed(raw)
    assert (event.event, event.data) == ("note", "one\ntwo")
