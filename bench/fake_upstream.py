"""An independent OpenAI-compatible fake upstream for bench/cores.py.

    python -m bench.fake_upstream --port 0 [--ttft-ms 200] [--tokens 32] [--interval-ms 20]

`POST /v1/chat/completions` (any body) answers an SSE stream of chat-completion chunks:
the first token `--ttft-ms` after the request arrived, then one every `--interval-ms`
(deadlines from the arrival, so a busy loop does not stretch the stream), then a
`finish_reason` chunk and `data: [DONE]`. Every token is one word and one space (the
load generator counts spaces). `GET /health` answers 200.

It is deliberately not sluice's simulated provider (`sim/provider.py`): the benchmark
compares sluice with a bare proxy, and sluice's own code must not be on both sides of it.
It imports nothing from sluice. One asyncio server speaks HTTP/1.1 (keep-alive, chunked)
and HTTP/2 with prior knowledge (h2c, via `h2`) on the same port, told apart by the
connection preface. With `--reuse-port`, several copies share one port (SO_REUSEPORT), so
the upstream is not what saturates first on a machine with many cores.

Prints `READY <port>` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

H2_PREFACE = b"PRI * HTTP/2.0"


class Script:
    """The stream every request gets: its timing and its bytes, encoded once."""

    def __init__(self, ttft_ms: float, tokens: int, interval_ms: float):
        self.ttft = ttft_ms / 1000.0
        self.interval = interval_ms / 1000.0
        self.tokens = tokens
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-1"}

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        self.role = chunk({"role": "assistant", "content": ""})
        self.token = chunk({"content": "tok "})
        self.end = chunk({}, "stop") + b"data: [DONE]\n\n"

    def frames(self):
        """(seconds after arrival, bytes) for each write of one stream."""
        yield self.ttft, self.role + self.token
        for i in range(1, self.tokens):
            yield self.ttft + i * self.interval, self.token
        yield self.ttft + (self.tokens - 1) * self.interval, self.end


class Stats:
    calls = 0
    open = 0


async def _until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


# --- HTTP/1.1 -----------------------------------------------------------------------------------
async def serve_http1(script: Script, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        lines = head.decode("latin-1").split("\r\n")
        method, path = (lines[0].split(" ") + ["", ""])[:2]
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length") or 0)
        if length:
            await reader.readexactly(length)
        keep = headers.get("connection", "").lower() != "close"
        arrived = time.monotonic()
        if method == "POST" and path.startswith("/v1/chat/completions"):
            Stats.calls += 1
            Stats.open += 1
            try:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                    b"transfer-encoding: chunked\r\n" + (b"" if keep else b"connection: close\r\n") + b"\r\n"
                )
                for at, data in script.frames():
                    await _until(arrived + at)
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            finally:
                Stats.open -= 1
        else:
            body = json.dumps({"calls": Stats.calls, "open": Stats.open}).encode() if path == "/stats" else b"ok"
            status = b"200 OK" if method == "GET" else b"404 Not Found"
            writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
        if not keep:
            return
        head = await reader.readuntil(b"\r\n\r\n")


# --- HTTP/2 with prior knowledge ----------------------------------------------------------------
async def serve_h2(script: Script, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    windows = asyncio.Event()  # set whenever the peer opens a flow-control window
    tasks: dict[int, asyncio.Task] = {}
    paths: dict[int, bytes] = {}

    def flush() -> None:
        data = conn.data_to_send()
        if data:
            writer.write(data)

    async def send(sid: int, data: bytes, end: bool = False) -> None:
        while conn.local_flow_control_window(sid) < len(data):
            windows.clear()
            await windows.wait()
        conn.send_data(sid, data, end_stream=end)
        flush()

    async def respond(sid: int, arrived: float) -> None:
        path = paths.pop(sid, b"")
        try:
            if not path.startswith(b"/v1/chat/completions"):
                body = json.dumps({"calls": Stats.calls, "open": Stats.open}).encode() if path == b"/stats" else b"ok"
                conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(len(body)).encode())])
                await send(sid, body, end=True)
                return
            Stats.calls += 1
            Stats.open += 1
            try:
                conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/event-stream")])
                flush()
                frames = list(script.frames())
                for i, (at, data) in enumerate(frames):
                    await _until(arrived + at)
                    await send(sid, data, end=i == len(frames) - 1)
            finally:
                Stats.open -= 1
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the client reset the stream
        finally:
            tasks.pop(sid, None)

    data = first
    try:
        while data:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    paths[ev.stream_id] = dict(ev.headers).get(b":path", b"")
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    tasks[ev.stream_id] = asyncio.ensure_future(respond(ev.stream_id, time.monotonic()))
                elif isinstance(ev, h2.events.StreamReset):
                    task = tasks.pop(ev.stream_id, None)
                    if task:
                        task.cancel()
                elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                    windows.set()
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return
            flush()
            data = await reader.read(65536)
    finally:
        for task in list(tasks.values()):
            task.cancel()


async def handle(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(H2_PREFACE):
            await serve_h2(script, head, reader, writer)
        else:
            await serve_http1(script, head, reader, writer)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.transport.abort()


async def main_async(args) -> None:
    script = Script(args.ttft_ms, args.tokens, args.interval_ms)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", args.port))
    server = await asyncio.start_server(lambda r, w: handle(script, r, w), sock=sock, backlog=4096)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=200.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--reuse-port", action="store_true", help="share the port with other copies (SO_REUSEPORT)")
    args = p.parse_args(argv)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(main_async(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
