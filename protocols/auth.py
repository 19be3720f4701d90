"""Authentication with the cluster secret: pure functions, no I/O.

One secret (`SLUICE_CLUSTER_SECRET`, or a random one run.py keeps in a file readable only
by its user) authenticates every byte that crosses a socket between sluice's own
processes: Thespian's frames (HMAC per frame, checked before `pickle.loads`), the stream
hub's connections (a challenge answered with an HMAC), and the hub tickets that say which
edge the Coalescer admitted to which stream. HMAC-SHA256 throughout; comparisons in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_BYTES = 32
MAC_BYTES = 32  # SHA-256


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def mac(secret: bytes, *parts: bytes | str) -> bytes:
    """HMAC-SHA256 of the parts, each length-prefixed so that ("ab", "c") != ("a", "bc")."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.digest()


def sign(secret: bytes, data: bytes) -> bytes:
    """`data` with its MAC in front (a Thespian frame's payload)."""
    return hmac.new(secret, data, hashlib.sha256).digest() + data


def verify(secret: bytes, signed: bytes) -> bytes | None:
    """The data of a `sign`ed payload, or None when the MAC does not match."""
    if len(signed) < MAC_BYTES:
        return None
    tag, data = signed[:MAC_BYTES], signed[MAC_BYTES:]
    if not hmac.compare_digest(tag, hmac.new(secret, data, hashlib.sha256).digest()):
        return None
    return data


def ticket(secret: bytes, stream_id: str, edge_id: str) -> str:
    """The Coalescer's proof that `edge_id` was admitted to `stream_id`; the hub checks it."""
    return mac(secret, b"hub-ticket", stream_id, edge_id).hex()


def ticket_ok(secret: bytes, stream_id: str, edge_id: str, presented: str) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters, and a presented
    # ticket comes off the wire.
    presented_bytes = presented.encode("utf-8", "surrogatepass") if isinstance(presented, str) else b""
    return hmac.compare_digest(ticket(secret, stream_id, edge_id).encode(), presented_bytes)


def unguessable_id(prefix: str) -> str:
    """An identifier nobody can guess (128 random bits)."""
    return prefix + secrets.token_hex(16)
