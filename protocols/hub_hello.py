"""The stream hub's handshake frames: pure code, no I/O (actors/hub.py and
edge/dataplane.py do the reading and writing).

Before anything else on a hub connection, the edge proves it holds the cluster secret:

    hub  -> edge   challenge: NONCE_BYTES (32) random bytes
    edge -> hub    answer:    1 byte n (1..MAX_EDGE_ID_BYTES), n bytes edge id (printable
                              ASCII), MAC_BYTES (32) bytes auth.mac(secret, b"hub-hello",
                              nonce, edge id)

Both frames have a fixed size or a size bounded by one length byte, so the hub reads at
most 1 + 64 + 32 bytes from a peer it does not know yet, and parses nothing else (no
msgpack) until the MAC matches. The edge id the answer names is the one the hub checks
tickets against for the rest of the connection. Then the connection carries msgpack
messages both ways (protocols/messages.py).
"""

from __future__ import annotations

import hmac
import secrets

from protocols import auth

NONCE_BYTES = 32
MAX_EDGE_ID_BYTES = 64
HELLO_TAG = b"hub-hello"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def encode_edge_id(edge_id: str) -> bytes:
    """The edge id as it travels; ValueError when it cannot (the edge's own bug)."""
    data = edge_id.encode("ascii")
    if not 1 <= len(data) <= MAX_EDGE_ID_BYTES or not edge_id.isprintable():
        raise ValueError(f"edge id must be 1..{MAX_EDGE_ID_BYTES} printable ASCII characters, got {edge_id!r}")
    return data


def answer(secret: bytes, nonce: bytes, edge_id: str) -> bytes:
    """The edge's answer to the hub's challenge."""
    data = encode_edge_id(edge_id)
    return bytes([len(data)]) + data + auth.mac(secret, HELLO_TAG, nonce, data)


def check(secret: bytes, nonce: bytes, edge_id: bytes, tag: bytes) -> str | None:
    """The authenticated edge id, or None. `edge_id` and `tag` are the answer's two parts
    after its length byte (the hub reads exactly that many bytes)."""
    if not hmac.compare_digest(auth.mac(secret, HELLO_TAG, nonce, edge_id), tag):
        return None
    try:
        text = edge_id.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None
