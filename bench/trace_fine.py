"""Finer trace points for `bench.trace --fine`: inside the edge's request handling and the
Pool's upstream call, where the product has no `protocols.trace.stamp()` of its own.

Installed by the traced launcher only (`python -m bench.trace launch` with
SLUICE_TRACE_FINE=1), before run.main() starts anything, so the forked actors inherit it:
it wraps a few methods (httpcore's, the edge's, the Pool's) with stamps and changes
nothing else. Each wrapped call costs a stamp or two (~20 µs each while tracing), so the
stages around them read ~0.1 ms slower than in an untraced run; use them to split a stage,
not for its total. A stamp is tied to its request through a context variable set in the
task that runs it (the edge's request task, the Pool's call task).

The points, in path order (bench.trace's FINE_STAGES):
  edge: ASGI entry → Edge.chat → body read → Edge.admit → LocalStreams.join (edge_join)
  Pool: _open → _attempts (the call task runs) → run_call (request built, connection
  leased) → httpcore pool → its connection → first socket write → written
  → (the provider receives it) ...
  provider's first byte → the Pool reads the first DATA → hub publishes (hub_delta); this
  one is stamped for the task that read, so it is right at one stream only
"""

from __future__ import annotations

import contextvars
import functools
import time

from protocols import trace

FINE_ENV = "SLUICE_TRACE_FINE"

_call: contextvars.ContextVar = contextvars.ContextVar("fine_call", default=None)  # the Pool's OpenStream
_front: contextvars.ContextVar = contextvars.ContextVar("fine_front", default=None)  # the edge's {point: time}


def install() -> None:
    _install_pool()
    _install_edge()


_stamped: set = set()


def _stamp_once(point: str, msg) -> None:
    """Only a call's first pass counts (bench.trace keeps the first), and a write or read
    per token would slow the run down: one stamp a point a call."""
    if msg is None or (point, msg.stream_id) in _stamped:
        return
    if len(_stamped) > 100_000:
        _stamped.clear()
    _stamped.add((point, msg.stream_id))
    trace.stamp(point, "pool", msg)


def _wrap(owner, name: str, before: str | None = None, after: str | None = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def wrapped(*args, **kwargs):
        if before:
            _stamp_once(before, _call.get())
        result = await original(*args, **kwargs)
        if after:
            _stamp_once(after, _call.get())
        return result

    setattr(owner, name, wrapped)


def _install_pool() -> None:
    import h2.events
    from httpcore._async import connection, connection_pool, http2

    import actors.pool as pool
    import actors.upstream as upstream

    attempts = pool.PoolRuntime._attempts

    async def _attempts(self, msg, *args, **kwargs):
        _call.set(msg)
        trace.stamp("fine_attempts", "pool", msg)
        return await attempts(self, msg, *args, **kwargs)

    pool.PoolRuntime._attempts = _attempts

    run_call = upstream.run_call  # _attempts imports it from the module at each call

    async def traced_run_call(*args, **kwargs):
        trace.stamp("fine_run_call", "pool", _call.get())
        return await run_call(*args, **kwargs)

    upstream.run_call = traced_run_call
    _wrap(connection_pool.AsyncConnectionPool, "handle_async_request", "fine_pool_request")
    _wrap(connection.AsyncHTTPConnection, "handle_async_request", "fine_connection_request")
    # not replaced by patches/ (their methods are installed later, in the Pool process)
    _wrap(http2.AsyncHTTP2Connection, "_write_outgoing_data", "fine_write", "fine_written")

    read = http2.AsyncHTTP2Connection._read_incoming_data

    async def traced_read(self, request):
        events = await read(self, request)
        if any(isinstance(e, h2.events.DataReceived) for e in events):
            _stamp_once("fine_data_read", _call.get())
        return events

    http2.AsyncHTTP2Connection._read_incoming_data = traced_read


def _install_edge() -> None:
    import uvicorn

    import edge.app as app
    import edge.streams as streams

    config_init = uvicorn.Config.__init__

    def traced_config(self, asgi_app, *args, **kwargs):
        async def entry(scope, receive, send):
            if scope["type"] == "http":
                _front.set({"fine_asgi": time.time()})
            return await asgi_app(scope, receive, send)

        config_init(self, entry, *args, **kwargs)

    uvicorn.Config.__init__ = traced_config

    def mark(point: str) -> None:
        seen = _front.get()
        if seen is not None:
            seen.setdefault(point, time.time())

    chat, json_body, admit, join = app.Edge.chat, app.Edge.json_body, app.Edge.admit, streams.LocalStreams.join

    async def traced_chat(self, request):
        mark("fine_chat")
        return await chat(self, request)

    async def traced_json_body(self, request):
        body = await json_body(self, request)
        mark("fine_body")
        return body

    async def traced_admit(self, *args, **kwargs):
        mark("fine_admit")
        return await admit(self, *args, **kwargs)

    async def traced_join(self, request_id, *args, **kwargs):
        # The request id exists from here on: write the points seen before it, at their times.
        write = trace._tracer.write if trace._tracer is not None else None
        if write is not None:
            trace.stamp("edge_join", "edge", request_id)  # opens this process's file if needed
            for point, at in (_front.get() or {}).items():
                with write.lock:
                    write.f.write(f"{at}\t{point}\tedge\t-\trequest_id={request_id}\n")
        return await join(self, request_id, *args, **kwargs)

    app.Edge.chat, app.Edge.json_body, app.Edge.admit = traced_chat, traced_json_body, traced_admit
    streams.LocalStreams.join = traced_join


POINTS = [
    (point, None, None, point)
    for point in (
        "fine_asgi",
        "fine_chat",
        "fine_body",
        "fine_admit",
        "fine_attempts",
        "fine_run_call",
        "fine_pool_request",
        "fine_connection_request",
        "fine_write",
        "fine_written",
        "fine_data_read",
    )
]

STAGES = [
    ("(fine) client send → edge ASGI entry", "client_send", "fine_asgi"),
    ("(fine) ASGI entry → Edge.chat", "fine_asgi", "fine_chat"),
    ("(fine) Edge.chat → body read", "fine_chat", "fine_body"),
    ("(fine) body read → Edge.admit", "fine_body", "fine_admit"),
    ("(fine) Edge.admit → edge join", "fine_admit", "edge_join"),
    ("(fine) Pool loop _open → call task runs", "pool_open", "fine_attempts"),
    ("(fine) call task → run_call (built, leased)", "fine_attempts", "fine_run_call"),
    ("(fine) run_call → httpcore pool", "fine_run_call", "fine_pool_request"),
    ("(fine) httpcore pool → its connection", "fine_pool_request", "fine_connection_request"),
    ("(fine) connection → first socket write", "fine_connection_request", "fine_write"),
    ("(fine) first write → written", "fine_write", "fine_written"),
    ("(fine) written → sim receives the call", "fine_written", "sim_started"),
    # A read is stamped for the task that made it: right at one stream only (bench.trace --levels 1)
    ("(fine, c=1 only) sim first byte → Pool reads a DATA", "sim_first_byte", "fine_data_read"),
    ("(fine, c=1 only) Pool reads it → hub publishes delta", "fine_data_read", "hub_delta"),
]
