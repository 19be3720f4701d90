"""Against the real gateway (issue 10): a local process that knows a live stream's id (an
admin's `show pool` lists them) and connects to the Pool's stream hub gets none of it;
nothing the actors report (admin show, /readyz) contains a prompt."""

from __future__ import annotations

import json
import select
import socket
import uuid

import pytest

from protocols import auth, hub_hello
from protocols import messages as m
from tests.support import (
    SSEClient,
    admin_gateway,
    admin_state,
    chat_body,
    data_events,
    get_json,
    listening_ports,
    request,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(sim):
    with admin_gateway(sim) as gateway:
        yield gateway


def hub_port(gw) -> int:
    """The Pool process listens on its Thespian port and on the hub's; the hub is the one
    that speaks first (its challenge)."""
    status, ready = get_json(gw.url + "/readyz")
    assert status == 200, ready
    ports = [port for _, port in listening_ports({ready["actors"]["pool"]["pid"]})]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for port in ports]
    try:
        readable, _, _ = select.select(socks, [], [], 10)
        assert len(readable) == 1, (ports, readable)
        return readable[0].getpeername()[1]
    finally:
        for s in socks:
            s.close()


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """All the hub sends until it closes the connection; fails if it keeps it open. The hub
    closes with our unread bytes in its buffer, so the kernel may answer with a reset,
    which can also discard what it had sent (the challenge): a reset counts as the end."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def open_until_delta(url: str, text: str) -> SSEClient:
    client = SSEClient(url + "/api/chat", chat_body(text))
    assert client.status == 200, client.body()
    while True:
        name, data = client.next()
        if name == "message" and data["type"] == "delta":
            return client


def test_a_raw_socket_to_the_hub_gets_nothing_of_a_live_stream(gw):
    marker = uuid.uuid4().hex
    client = open_until_delta(gw.url, f"private {marker}\n#sim tokens=150 token_interval_ms=20")
    try:
        open_calls = admin_state(gw)["results"]["pool"]["open_calls"]
        assert len(open_calls) == 1, open_calls
        stream_id = open_calls[0]
        assert marker not in stream_id and client.headers["x-request-id"] not in stream_id
        port = hub_port(gw)

        # 1: the challenge ignored, a forged Subscribe sent at once (with a ticket guessed
        # for a made-up edge id); 2: the challenge answered with a guessed secret.
        for answer_with in (None, auth.new_secret()):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                if answer_with is not None:
                    nonce = raw.recv(hub_hello.NONCE_BYTES, socket.MSG_WAITALL)
                    raw.sendall(hub_hello.answer(answer_with, nonce, "edge-intruder"))
                raw.sendall(
                    m.encode(m.Subscribe(stream_id, auth.ticket(answer_with or b"", stream_id, "edge-intruder")))
                )
                received = read_to_eof(raw)
            most = hub_hello.NONCE_BYTES if answer_with is None else 0  # the challenge, nothing more
            assert len(received) <= most, received
            assert marker.encode() not in received and b"delta" not in received

        events = data_events(client.read_all())  # the admitted client still gets everything
        assert events[-1]["type"] == "done"
        assert sum(1 for e in events if e["type"] == "delta") == 150
        hub = admin_state(gw)["results"]["pool"]["hub"]
        assert hub["refused_handshakes"] >= 2 and hub["edge_connections"] == 1
    finally:
        client.close()


def test_no_actor_state_and_no_readiness_answer_holds_a_prompt(gw):
    marker = uuid.uuid4().hex
    client = open_until_delta(gw.url, f"my secret prompt {marker}\n#sim tokens=100 token_interval_ms=20")
    try:
        shown = json.dumps(admin_state(gw))
        status, _, ready = request("GET", gw.url + "/readyz")
        assert '"coalescer:0"' in shown and '"pool"' in shown and '"pacer:simulated"' in shown  # every actor answered
        assert marker not in shown and marker.encode() not in ready
    finally:
        client.close()
    # Nor once the call is over (cancelled: the client left).
    wait_until(lambda: not admin_state(gw)["results"]["pool"]["open_calls"], message="the call to end")
    assert marker not in json.dumps(admin_state(gw))
