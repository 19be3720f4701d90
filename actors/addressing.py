"""Actor addresses as plain strings.

Messages are msgpack, so an address travels as "host:port" (multiprocTCPBase only) and is
turned back into a Thespian `ActorAddress` at the receiving end. (Which host Thespian's
sockets bind to is a patch of Thespian's: patches/thespian_bind.py.)
"""

from __future__ import annotations

from thespian.actors import ActorAddress
from thespian.system.transport import IPBase


def to_string(address: ActorAddress) -> str:
    host, port = address.addressDetails.sockname[:2]
    return f"{host}:{port}"


def from_string(text: str) -> ActorAddress:
    host, _, port = text.rpartition(":")
    return ActorAddress(IPBase.TCPv4ActorAddress(host, int(port), external=True))
