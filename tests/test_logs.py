"""Log lines (protocols/logfmt.py) and the access log (edge/access_log.py): with
SLUICE_LOG_FORMAT=json every line the gateway's processes print is one JSON object; each
request gets one access line when its response ends; a prompt, an Authorization header or
an API key never reaches the log, unless SLUICE_LOG_PROMPTS=1 lets the messages in."""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
from pathlib import Path

import pytest

from protocols.logfmt import JsonFormatter, TextFormatter
from tests.support import SSEClient, chat_body, data_events, request, running_gateway, stream_chat, wait_until

pytestmark = pytest.mark.integration


def record(msg="hello %s", args=("world",), exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("sluice.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_extra_fields_and_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    line = JsonFormatter().format(record(exc_info=exc, route="/api/chat", status=200))
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "sluice.test" and data["message"] == "hello world"
    assert data["route"] == "/api/chat" and data["status"] == 200
    assert data["time"].endswith("Z") and "ValueError: boom" in data["exc"]


def test_text_lines_show_the_extra_fields_on_the_message_line():
    line = TextFormatter().format(record(route="/api/chat", key_id=None))
    assert line.endswith("sluice.test: hello world route=/api/chat")  # None fields are left out


def run_traffic(gw, prompt: str, secret: str) -> dict:
    """A stream, a non-streamed /v1 answer, a cancel of an unknown id (404), a disconnect."""
    auth = {"authorization": f"Bearer {secret}"}
    status, headers, events = stream_chat(gw.url + "/api/chat", chat_body(f"{prompt}\n#sim tokens=5"), auth)
    assert status == 200 and data_events(events)[-1]["type"] == "done"
    status, _, _ = request("POST", gw.url + "/v1/chat/completions", chat_body(f"{prompt} v1\n#sim tokens=2"), auth)
    assert status == 200
    unknown = uuid.uuid4().hex
    assert request("POST", f"{gw.url}/api/chat/{unknown}/cancel", headers=auth)[0] == 404
    client = SSEClient(gw.url + "/api/chat", chat_body(f"{prompt} gone\n#sim tokens=400 token_interval_ms=50"), auth)
    while client.next()[1].get("type") != "delta":
        pass
    client.close()
    return {"request_id": headers["x-request-id"], "unknown": unknown}


def access_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["logger"] == "sluice.access"]


def stop_and_read(gw) -> tuple[list[dict], str]:
    """SIGTERM (the drain path), then every line of the gateway's output, as JSON."""
    assert gw.stop(signal.SIGTERM) == 0
    text = Path(gw.log_path).read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # each one JSON, or this fails
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    return lines, text


def test_json_logs_with_an_access_line_per_request_and_no_secrets(sim):
    prompt, secret = f"distinctive-prompt-{uuid.uuid4().hex}", f"sk-sluice-{uuid.uuid4().hex}"
    env = {"SIMULATED_BASE_URL": sim, "SLUICE_LOG_FORMAT": "json", "SLUICE_LOG_LEVEL": "INFO"}
    with running_gateway(env) as gw:
        seen = run_traffic(gw, prompt, secret)
        # the disconnected stream's line is written when the edge notices it left
        wait_until(
            lambda: '"outcome": "cancelled"' in Path(gw.log_path).read_text(), timeout=10, message="its access line"
        )
        lines, text = stop_and_read(gw)
    assert prompt not in text and secret not in text and seen["unknown"] not in text
    assert {"uvicorn.error", "sluice", "sluice.access", "sluice.server"} <= {line["logger"] for line in lines}
    by_route = {}
    for line in access_lines(lines):
        by_route.setdefault((line["method"], line["route"]), []).append(line)
    streamed = next(line for line in by_route[("POST", "/api/chat")] if line["request_id"] == seen["request_id"])
    assert streamed["status"] == 200 and streamed["outcome"] == "done" and streamed["error_code"] is None
    assert streamed["ttft_ms"] > 0 and streamed["bytes_sent"] > 0 and streamed["duration_ms"] >= streamed["ttft_ms"]
    assert "key_id" in streamed and streamed["client"] == "127.0.0.1" and "messages" not in streamed
    gone = [line for line in by_route[("POST", "/api/chat")] if line["outcome"] == "cancelled"]
    assert len(gone) == 1 and gone[0]["error_code"] == "disconnected"
    [v1] = by_route[("POST", "/v1/chat/completions")]
    assert v1["outcome"] == "done" and v1["status"] == 200 and v1["ttft_ms"] > 0 and v1["request_id"]
    [cancel] = by_route[("POST", "/api/chat/{request_id}/cancel")]  # the template, not the id
    assert cancel["status"] == 404 and cancel["outcome"] == "rejected" and cancel["error_code"] == "not_found"


def test_log_prompts_lets_the_messages_in_but_never_the_key(sim):
    prompt, secret = f"distinctive-prompt-{uuid.uuid4().hex}", f"sk-sluice-{uuid.uuid4().hex}"
    env = {
        "SIMULATED_BASE_URL": sim,
        "SLUICE_LOG_FORMAT": "json",
        "SLUICE_LOG_LEVEL": "INFO",
        "SLUICE_LOG_PROMPTS": "1",
    }
    with running_gateway(env) as gw:
        status, _, events = stream_chat(gw.url + "/api/chat", chat_body(prompt), {"authorization": f"Bearer {secret}"})
        assert status == 200
        lines, text = stop_and_read(gw)
    assert secret not in text
    [line] = [line for line in access_lines(lines) if line["route"] == "/api/chat"]
    assert line["messages"] == [{"role": "user", "content": prompt}]
