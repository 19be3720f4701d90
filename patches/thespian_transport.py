"""Thespian's TCP frames, authenticated with the cluster secret before anything is unpickled.

Thespian 4.0 sends every frame of its TCP transport as `b"<len>>" + pickle.dumps(...)` and
reads it back with `pickle.loads`, whoever sent it: any local user, or a request forgery
that reaches the admin or an actor port, could run code as the gateway. Every frame goes
through one module-level name, `TCPTransport.serializer` (`dumps` on send, `ReceiveBuffer(
serializer.loads)` on receive, for data and ACKs alike), so `install(secret)` replaces it
with `Authenticated`: `dumps` puts an HMAC-SHA256 of the pickle in front of it
(`protocols.auth.sign`), `loads` checks that MAC (`protocols.auth.verify`, constant time)
and raises `FrameRefused` before a byte reaches `pickle.loads` when it does not match.

Thespian already survives a frame that fails to deserialize: the receiving side logs it,
answers a courtesy ACK+DATAERR and closes that connection; the actor or admin goes on
(tests/test_transport_auth.py sends forged frames to every port and then serves a chat).
The two ACK packets are pre-serialized at import time in `streamBuffer` with plain pickle
and imported by name into `TCPTransport`, so they are rebuilt signed here: a peer reads
them through the same `loads`.

Installed explicitly by `patches.install_thespian(host, secret)`, before `ActorSystem(...)`
is first called in a process (`actors/system.prepare`): the admin and every actor are
forked from that process and inherit the patch and the secret. Written for Thespian 4.0.x
(4.0.1); it checks the version and the names it patches and refuses loudly on anything
else: without it the transport unpickles anyone's frames, so there is no fallback.
"""

from __future__ import annotations

import pickle

from patches import versions
from protocols import auth

LIBRARY, WRITTEN_FOR = "thespian", "4.0."


class FrameRefused(ValueError):
    """A frame whose MAC does not match the cluster secret: dropped unread."""


class Authenticated:
    """A stand-in for the `pickle` module as Thespian's transport uses it."""

    def __init__(self, secret: bytes):
        if not secret:
            raise ValueError("the cluster secret is empty")
        self._secret = secret

    def dumps(self, obj, *args, **kwargs) -> bytes:
        return auth.sign(self._secret, pickle.dumps(obj, *args, **kwargs))

    def loads(self, frame, *args, **kwargs):
        data = auth.verify(self._secret, bytes(frame))
        if data is None:
            raise FrameRefused("frame refused: its MAC does not match the cluster secret")
        return pickle.loads(data, *args, **kwargs)


def install(secret: bytes) -> None:
    """Authenticate every frame of Thespian's TCP transport in this process (and in every
    process forked from it) with `secret`. Idempotent for the same secret."""
    versions.check(__name__, LIBRARY, WRITTEN_FOR)
    from thespian.system.transport import TCPTransport, streamBuffer

    current = getattr(TCPTransport, "serializer", None)
    expected = ("toSendBuffer", "ReceiveBuffer", "ackMsg", "ackDataErrMsg", "isControlMessage")
    if not (current is pickle or isinstance(current, Authenticated)) or not all(
        hasattr(TCPTransport, name) for name in expected
    ):
        raise RuntimeError(
            "Thespian's TCPTransport does not look as patches/thespian_transport.py expects "
            "(module-level serializer = pickle, streamBuffer's ACK packets)"
        )
    if isinstance(current, Authenticated) and current._secret == secret:
        return
    serializer = Authenticated(secret)
    TCPTransport.serializer = serializer
    for module in (TCPTransport, streamBuffer):
        module.ackMsg = streamBuffer.toSendBuffer(streamBuffer.ackPacket, serializer.dumps)
        module.ackDataErrMsg = streamBuffer.toSendBuffer(streamBuffer.ackDataErrPacket, serializer.dumps)


def installed() -> bool:
    from thespian.system.transport import TCPTransport

    return isinstance(TCPTransport.serializer, Authenticated)
