"""Pure code, no I/O: message schema and codec, events, SSE framing, provider formats."""
