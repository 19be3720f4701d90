"""Connection limits uvicorn does not have: a header-read deadline and a per-address cap.

Why: uvicorn reads request headers with no deadline at all (`timeout_keep_alive` only
covers the idle time *between* requests on a kept-alive connection), so a client that
opens connections and sends half a request line holds each one until the fd limit is
reached (3,000 half-open connections were held on main, slowloris-style). And nothing
stops one address from holding every connection the process can open.

- Header deadline (`SLUICE_HEADER_TIMEOUT_S`, default 10): a connection whose request
  headers are not complete within that many seconds is closed. The clock starts when the
  connection opens and again when the first byte of each next request arrives on a
  kept-alive connection (the idle time before it is uvicorn's keep-alive timeout); it
  stops when the headers are complete. Reading the body is the app's (bounded by
  SLUICE_MAX_BODY_BYTES). If an earlier response on the same connection is still being
  written (pipelining), that response is finished and the connection then closed.
- Per-address cap (`SLUICE_MAX_CONNECTIONS_PER_CLIENT`, default 256, 0 = no cap): a
  connection beyond the cap from the same client IP is answered at once with a 503
  `too_many_connections` (Retry-After: 1, Connection: close) and closed, before a byte
  of it is read; the others are untouched. Behind a proxy every client shares the
  proxy's address: raise the cap or set 0 there.

How: subclasses of uvicorn's two HTTP/1.1 protocol classes (httptools and h11), handed
to `uvicorn.Config(http=...)` by `protocol_class()`. Written against uvicorn 0.54.0; the
hooks used (`connection_made`, `connection_lost`, httptools' `on_message_begin` /
`on_headers_complete`, h11's `handle_events` and `Connection.their_state` /
`trailing_data`) are checked at import, so a uvicorn that renamed them fails at start,
not silently.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: uvicorn itself falls back to h11
    HttpToolsProtocol = None

log = logging.getLogger("sluice.edge.http")

_HOOKS = {
    H11Protocol: ("connection_made", "connection_lost", "handle_events"),
    HttpToolsProtocol: ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete"),
}
for _cls, _names in _HOOKS.items():
    if _cls is not None and not all(callable(getattr(_cls, n, None)) for n in _names):
        raise ImportError(
            f"edge/http_limits.py: uvicorn's {_cls.__name__} lacks one of {_names} (written for uvicorn 0.54)"
        )
if not hasattr(h11.Connection, "trailing_data"):
    raise ImportError("edge/http_limits.py: h11.Connection.trailing_data is gone")


class ConnectionLimits:
    """The settings, and the open connections per client address (one event loop)."""

    def __init__(self, header_timeout_s: float, max_per_client: int):
        self.header_timeout_s = header_timeout_s
        self.max_per_client = max_per_client
        self.open: dict[str, int] = {}

    def admit(self, host: str | None) -> bool:
        if host is None:  # a Unix socket: no address to count
            return True
        if self.max_per_client and self.open.get(host, 0) >= self.max_per_client:
            return False
        self.open[host] = self.open.get(host, 0) + 1
        return True

    def release(self, host: str | None) -> None:
        if host is None:
            return
        left = self.open.get(host, 0) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)


def _refusal() -> bytes:
    body = json.dumps(
        {"error": {"code": "too_many_connections", "message": "too many open connections from this address"}}
    ).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _Limited:
    """The shared part; `limits` is set on the class by `protocol_class`."""

    limits: ConnectionLimits
    _counted = False
    _counted_host: str | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if not self.limits.admit(host):
            log.warning("refused a connection from %s: %d open already", host, self.limits.max_per_client)
            transport.write(_refusal())
            transport.close()
            return
        self._counted = True
        self._counted_host = host
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        if getattr(self, "_counted", False):
            self._counted = False
            self.limits.release(self._counted_host)
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # finish the response in progress, then close
            return
        log.info(
            "closed a connection from %s: no complete request headers within %g s",
            self._counted_host,
            self.limits.header_timeout_s,
        )
        self._close_now()

    def _close_now(self) -> None:
        self.transport.close()


class _H11Limited(_Limited, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm_header_timer()  # part of a next request has arrived
        elif self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # headers complete (or the connection is over)

    def _close_now(self) -> None:
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


if HttpToolsProtocol is not None:

    class _HttpToolsLimited(_Limited, HttpToolsProtocol):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()


def protocol_class(limits: ConnectionLimits, impl: str = "auto") -> type:
    """The protocol class for `uvicorn.Config(http=...)`: httptools when installed
    ("auto", as uvicorn chooses), else h11; `impl` forces one."""
    use_httptools = HttpToolsProtocol is not None and impl in ("auto", "httptools")
    if impl not in ("auto", "httptools", "h11") or (impl == "httptools" and HttpToolsProtocol is None):
        raise ValueError(f"unknown or unavailable HTTP implementation {impl!r}")
    base = _HttpToolsLimited if use_httptools else _H11Limited
    return type(base.__name__, (base,), {"limits": limits})
