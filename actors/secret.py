"""The cluster secret of this process (see protocols/auth.py for what it protects).

run.py installs it before the actor system starts; every actor is forked from that
process and inherits it, so it never travels in a message. The admin CLI and
`python -m actors.system stop` read it from the secret file.
"""

from __future__ import annotations

_secret: bytes | None = None


def install(secret: bytes) -> None:
    global _secret
    _secret = secret


def get() -> bytes:
    if _secret is None:
        raise RuntimeError("no cluster secret installed in this process (actors.secret.install)")
    return _secret


def installed() -> bool:
    return _secret is not None
