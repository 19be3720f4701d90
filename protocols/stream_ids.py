"""Stream ids: unguessable, and naming the Coalescer shard incarnation that owns the flight.

A stream id is `<random>~<owner tag>`: the random part (`auth.unguessable_id`, 128 bits) is
what makes it a secret, the tag is a hash of the address of the shard incarnation that
created the flight (`CoalescerLogic.me`, the address `MemberLost.incarnation` names when
it dies). The stream hub reads the tag to end the streams a dead shard left unopened: when
the Pacer died with it, nobody alive knew those flights (docs/reliability.md, "Process
crashes"). The tag is keyed with the cluster secret so that no internal address reaches a
client (the SSE meta event carries the stream id): a plain hash of `host:port` is undone
by hashing every port. What a client can still tell is that two of its streams had the
same shard incarnation. The hub takes a stream id only with the Coalescer's ticket for it
(`auth.ticket` signs the whole id, tag included).

A lease slice's grant is a stream id too, made by the Pacer (it is the lease's id): the
Pacer tags it with the shard it hands the grant to (`LeaseRequest.coalescer`, that shard's
own `me`), so it names its owner as the shard's own ids do. A stream id without a tag (an
older shard or Pacer) has no owner the hub knows: it is never ended for a shard's death by
the hub.
"""

from __future__ import annotations

from protocols import auth

TAG_SEPARATOR = "~"
TAG_CHARS = 16  # 64 bits of HMAC-SHA256: shard incarnations of one cluster never collide


def owner_tag(secret: bytes, owner: str) -> str:
    """The tag of the shard incarnation whose address is `owner`."""
    return auth.mac(secret, b"stream-owner", owner).hex()[:TAG_CHARS]


def owned(base: str, secret: bytes, owner: str) -> str:
    """`base` (a random id; the simulator's counted one) tagged with its owner."""
    return f"{base}{TAG_SEPARATOR}{owner_tag(secret, owner)}"


def new(secret: bytes, owner: str) -> str:
    """A new stream id for a flight of the shard incarnation `owner`."""
    return owned(auth.unguessable_id("s-"), secret, owner)


def tag_of(stream_id: str) -> str | None:
    """The owner tag a stream id carries (None: it names no owner)."""
    _, separator, tag = stream_id.rpartition(TAG_SEPARATOR)
    return tag if separator and len(tag) == TAG_CHARS else None
