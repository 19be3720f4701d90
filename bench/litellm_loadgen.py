"""A lean streaming load generator for bench/litellm_compare.py.

One cell = N concurrent workers, each running a bounded number of streaming requests
back to back against one target (the simulated provider directly, sluice, or LiteLLM).
It is deliberately thin so that it is not the bottleneck: plain asyncio streams (one
HTTP/1.1 connection per request, `Connection: close`), an incremental chunked-transfer
decoder, and the project's incremental SSE parser (`protocols.sse.SSEParser`, which does
not care where chunks were split). Every token is time-stamped when its bytes are read.

It runs as its own process (`python -m bench.litellm_loadgen`, spec as JSON on stdin,
result as JSON on stdout) so that its CPU is measured on its own (`rusage`) and it
does not share an interpreter with the orchestrator.

Wire formats understood:
  openai   OpenAI chat-completions SSE: `data: {"choices":[{"delta":{"content":..}}]}`,
           `data: [DONE]`, or an `{"error": ...}` object.
  sluice   sluice's /api/chat SSE: `data: {"type":"delta","delta":..}`, `meta`, `done`,
           `error`; `event: ping` frames are ignored.

Tokens: the simulated provider's tokens are words followed by one space, so a delta's
token count is its number of spaces (a gateway that merges tokens into one delta is
still counted right; the merged tokens share one arrival time).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocols.sse import SSEParser  # noqa: E402

READ_SIZE = 65536


class ChunkedDecoder:
    """Incremental HTTP/1.1 chunked transfer-coding decoder (chunks may split anywhere)."""

    def __init__(self) -> None:
        self.buf = b""
        self.data_left = -1  # -1: expecting a size line
        self.crlf_left = 0
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf = self.buf + data if self.buf else data
        out = bytearray()
        while not self.done and self.buf:
            if self.data_left < 0:
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    break
                size = int(self.buf[:nl].split(b";", 1)[0].strip() or b"0", 16)
                self.buf = self.buf[nl + 2 :]
                if size == 0:
                    self.done = True
                    break
                self.data_left, self.crlf_left = size, 2
            elif self.data_left > 0:
                take = self.buf[: self.data_left]
                out += take
                self.data_left -= len(take)
                self.buf = self.buf[len(take) :]
            else:
                skip = min(self.crlf_left, len(self.buf))
                self.buf = self.buf[skip:]
                self.crlf_left -= skip
                if self.crlf_left == 0:
                    self.data_left = -1
        return bytes(out)


def _request_bytes(target: dict, body: bytes) -> bytes:
    host = f"{target['host']}:{target['port']}"
    lines = [
        f"POST {target['path']} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    for k, v in (target.get("headers") or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def make_body(target: dict, text: str) -> bytes:
    msgs = [{"role": "user", "content": text}]
    if target["format"] == "sluice":
        body = {"messages": msgs}
    else:
        body = {"model": target.get("model", "sim-1"), "stream": True, "messages": msgs}
    return json.dumps(body).encode()


async def one_stream(target: dict, text: str, timeout_s: float, cancel_after_tokens: int | None = None) -> dict:
    """Run one streaming request. Returns a record:
    {ok, status, error, t0 (wall), ttft (s), tok (token arrival offsets, s), ntok, close_wall}."""
    rec: dict = {
        "ok": False,
        "status": None,
        "error": None,
        "t0": time.time(),
        "ttft": None,
        "tok": [],
        "ntok": 0,
        "close_wall": None,
        "text": text,
    }
    p0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(target["host"], target["port"])
            writer.write(_request_bytes(target, make_body(target, text)))
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            rec["status"] = status
            headers = {}
            for line in header_lines:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            if status != 200:
                raw = await reader.read(4096)
                rec["error"] = f"http_{status}"
                rec["detail"] = raw[:300].decode(errors="replace")
                return rec
            dechunk = ChunkedDecoder() if chunked else None
            parser = SSEParser()
            fmt = target["format"]
            tok = rec["tok"]
            while True:
                data = await reader.read(READ_SIZE)
                now = time.perf_counter() - p0
                if not data:
                    rec["error"] = rec["error"] or "truncated"
                    return rec
                if dechunk is not None:
                    data = dechunk.feed(data)
                for event in parser.feed(data):
                    if event.event != "message" or not event.data:
                        continue  # ping and other named events
                    if event.data == "[DONE]":
                        rec["ok"] = rec["error"] is None
                        return rec
                    try:
                        obj = json.loads(event.data)
                    except ValueError:
                        rec["error"] = "bad_json"
                        continue
                    content = None
                    if fmt == "sluice":
                        kind = obj.get("type")
                        if kind == "delta":
                            content = obj.get("delta") or ""
                        elif kind == "meta":
                            # sluice's own view: TTFT at the first provider byte, pacer queue wait
                            rec["gw_ttft_ms"] = obj.get("ttft_ms")
                            rec["gw_queue_ms"] = obj.get("queue_wait_ms")
                            rec["meta_at"] = now
                        elif kind == "done":
                            rec["ok"] = rec["error"] is None
                            return rec
                        elif kind == "error":
                            rec["error"] = f"inband_{obj.get('code')}"
                            rec["detail"] = str(obj.get("message"))[:300]
                    else:
                        if "error" in obj:
                            rec["error"] = "inband_error"
                            rec["detail"] = json.dumps(obj["error"])[:300]
                            continue
                        for choice in obj.get("choices") or ():
                            c = (choice.get("delta") or {}).get("content")
                            if c:
                                content = (content or "") + c
                    if content:
                        n = content.count(" ") or 1
                        if rec["ttft"] is None:
                            rec["ttft"] = now
                        tok.extend([round(now, 5)] * n)
                        rec["ntok"] += n
                        if cancel_after_tokens is not None and rec["ntok"] >= cancel_after_tokens:
                            rec["close_wall"] = time.time()
                            writer.transport.abort()  # the client goes away, as a closed tab would
                            writer = None
                            rec["ok"] = True
                            rec["error"] = None
                            return rec
    except TimeoutError:
        rec["error"] = "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
        rec["error"] = f"{type(exc).__name__}"
        rec["detail"] = str(exc)[:300]
    finally:
        if writer is not None:
            if rec["ok"]:
                writer.close()  # a finished stream: an orderly close
            else:
                writer.transport.abort()  # a failed or timed-out one: drop it at once
    return rec


async def run_cell(spec: dict) -> dict:
    """spec: target, concurrency, per_worker, warmup (streams per worker left out of stats),
    timeout_s, stagger_s, identical (same prompt for all), prompt, nonce, cancel_after_tokens."""
    target = spec["target"]
    n = int(spec["concurrency"])
    per_worker = int(spec.get("per_worker", 1))
    warmup = int(spec.get("warmup", 0))
    stagger = float(spec.get("stagger_s", 0.0))
    timeout_s = float(spec.get("timeout_s", 30.0))
    nonce = spec.get("nonce", "x")
    prompt = spec.get("prompt", "")
    identical = bool(spec.get("identical"))
    cancel_after = spec.get("cancel_after_tokens")
    records: list[dict] = []

    async def worker(i: int) -> None:
        if stagger and n > 1:
            await asyncio.sleep(stagger * i / n)
        for j in range(per_worker):
            text = f"bench {nonce}" if identical else f"bench {nonce} w{i} r{j} {random.getrandbits(48):x}"
            if prompt:
                text += "\n" + prompt
            rec = await one_stream(target, text, timeout_s, cancel_after)
            rec["worker"], rec["seq"], rec["warmup"] = i, j, j < warmup
            records.append(rec)

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(n)))
    wall = time.perf_counter() - w0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"records": records, "wall_s": wall, "loadgen_cpu_s": cpu}


def main() -> int:
    spec = json.loads(sys.stdin.read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * int(spec.get("concurrency", 1)) + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    result = asyncio.run(run_cell(spec))
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        os._exit(130)
