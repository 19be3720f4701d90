"""The Starlette edge: HTTP/SSE routes that turn requests into actor messages."""
