"""The header-read deadline and the per-address connection cap (edge/http_limits.py), on a
real uvicorn over loopback with both of its HTTP/1.1 implementations, and wired into
run.py's gateway."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.http_limits import ConnectionLimits, protocol_class
from tests.support import free_port, running_gateway, wait_until

pytestmark = pytest.mark.unit

IMPLS = ["h11", "httptools"]
GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


async def ok(request):
    return JSONResponse({"ok": True})


@contextmanager
def serving(impl: str, header_timeout_s: float, max_per_client: int):
    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=[Route("/ok", ok)]),
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=60,  # so a close is the header deadline's, not keep-alive's
        http=protocol_class(ConnectionLimits(header_timeout_s, max_per_client), impl),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10, message="uvicorn started")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response (these are small, with content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (recv returns EOF within the socket timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("impl", IMPLS)
def test_half_a_request_line_is_closed_after_the_header_timeout(impl):
    with serving(impl, 0.3, 0) as port:
        with connect(port) as slow:
            slow.sendall(b"GET /ok HT")
            assert closed_by_server(slow)
        with connect(port) as fine:  # a client that finishes its headers is served
            fine.sendall(GET)
            assert read_response(fine).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("impl", IMPLS)
def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline(impl):
    with serving(impl, 0.3, 0) as port:
        with connect(port) as sock:
            for _ in range(2):
                sock.sendall(GET)
                assert read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /ok HTTP/1.1\r\nHost:")
            assert closed_by_server(sock)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_connection_beyond_the_per_address_cap_gets_a_503_and_the_others_are_served(impl):
    cap = 3
    with serving(impl, 30, cap) as port:
        held = [connect(port) for _ in range(cap)]
        try:
            for sock in held:  # each one served, so the server has counted it
                sock.sendall(GET)
                assert read_response(sock).startswith(b"HTTP/1.1 200")
            with connect(port) as extra:
                extra.sendall(GET)
                answer = read_response(extra)
                assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
                assert closed_by_server(extra)
            held[0].sendall(GET)  # the held ones still work
            assert read_response(held[0]).startswith(b"HTTP/1.1 200")
            held.pop(0).close()  # one leaves: a new one gets in

            def served() -> bool:
                with connect(port) as again:
                    again.sendall(GET)
                    return read_response(again).startswith(b"HTTP/1.1 200")

            wait_until(served, timeout=10, message="a connection admitted again")
        finally:
            for sock in held:
                sock.close()


@pytest.mark.integration  # starts a gateway or a process of its own
def test_the_gateway_applies_both_limits():
    env = {"SLUICE_HEADER_TIMEOUT_S": "0.5", "SLUICE_MAX_CONNECTIONS_PER_CLIENT": "6"}
    with running_gateway(env) as gw:
        with connect(gw.port) as slow:
            slow.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Ty")
            assert closed_by_server(slow)
        held, refused = [], None
        try:
            for _ in range(7):  # the test's own HTTP pool may hold one of the six
                sock = connect(gw.port)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = read_response(sock)
                held.append(sock)
                if answer.startswith(b"HTTP/1.1 503"):
                    refused = answer
                    break
            assert refused is not None and b"too_many_connections" in refused and len(held) >= 6
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: _get(gw.port, b"/readyz").startswith(b"HTTP/1.1 200"), timeout=15, message="readyz 200")


def _get(port: int, path: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_response(sock)
