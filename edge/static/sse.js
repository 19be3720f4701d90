// An incremental Server-Sent Events parser (the WHATWG event-stream format) for
// fetch + ReadableStream, where a read may hold part of a frame, several frames, or half
// of a multi-byte UTF-8 character.
//
//   const parser = new SSEParser();
//   for each chunk (Uint8Array or string): for (const ev of parser.push(chunk)) ...
//   at the end of the body: for (const ev of parser.end()) ...
//
// Each event is {event, data, id}: `event` is the `event:` field ("message" when none),
// `data` the `data:` lines joined with "\n", `id` the last `id:` seen. Comment lines
// (":...") are skipped. Unlike a browser's EventSource, an event with a type but no data
// (e.g. a bare `event: ping`) is still delivered: sluice uses pings as "the stream is open".
export class SSEParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.buffer = "";
    this.lastId = "";
    this._reset();
  }

  _reset() {
    this.type = "";
    this.data = [];
    this.seen = false;
  }

  push(chunk) {
    const text = typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    this.buffer += text;
    return this._lines(false);
  }

  end() {
    this.buffer += this.decoder.decode();
    const out = this._lines(true);
    // A frame the server did not finish with a blank line is incomplete: dropped, as the
    // format says.
    this._reset();
    return out;
  }

  _lines(final) {
    const out = [];
    let start = 0;
    const buf = this.buffer;
    for (;;) {
      let i = start;
      while (i < buf.length && buf[i] !== "\n" && buf[i] !== "\r") i++;
      if (i >= buf.length) break; // no line end yet
      // "\r" at the very end may be the first half of "\r\n": wait for the next read
      if (buf[i] === "\r" && i + 1 >= buf.length && !final) break;
      const line = buf.slice(start, i);
      start = buf[i] === "\r" && buf[i + 1] === "\n" ? i + 2 : i + 1;
      const ev = this._line(line);
      if (ev) out.push(ev);
    }
    this.buffer = buf.slice(start);
    return out;
  }

  _line(line) {
    if (line === "") {
      if (!this.seen) return null;
      const ev = { event: this.type || "message", data: this.data.join("\n"), id: this.lastId };
      this._reset();
      return ev;
    }
    if (line[0] === ":") return null; // a comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") {
      this.data.push(value);
      this.seen = true;
    } else if (field === "event") {
      this.type = value;
      this.seen = true;
    } else if (field === "id") {
      if (!value.includes("\0")) this.lastId = value;
    }
    // "retry" and unknown fields: ignored
    return null;
  }
}

// Reads a fetch Response's body to its end, calling onEvent(ev) for each event.
// Resolves when the body ends; rejects with the read's error (an AbortError after Stop).
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const parser = new SSEParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    for (const ev of parser.push(value)) onEvent(ev);
  }
  for (const ev of parser.end()) onEvent(ev);
}
