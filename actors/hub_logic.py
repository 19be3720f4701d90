"""The stream hub's logic: streams, replay buffers, subscribers, linger and orphans.

Plain logic, no sockets and no clock (the caller passes `now`): `actors/hub.py` hosts it
on the Pool's asyncio loop (handshake, connections, write batching), and the simulation
(`sim/harness.py`) runs the same class as the simulated Pool's hub, so a fault here
breaks chaos seeds too.

A peer is whatever the host uses to reach one edge process (a connection; in the
simulation, the edge's node name); the logic only keeps it and hands it back in
`Send(peer, msg)` effects. A stream's events are kept from its first to its last (the
replay buffer): a peer that subscribes late gets everything so far in one frame (seq 0),
then the rest live, so every subscriber sees the same events in the same order. A
`Subscribe` is served only with the Coalescer's ticket for the edge id the peer
authenticated as (`protocols.auth.ticket_ok`); otherwise the answer is
`SubscribeRefused` and nothing of the stream. A finished stream lingers `linger_s` for
late subscribers, then is dropped; a stream subscribed to but never opened (an actor
lost a message) ends with an error after `orphan_s`, so no client waits forever.

A stream id names the Coalescer shard incarnation that owns its flight
(protocols/stream_ids.py). When that incarnation dies (`owner_lost`, the Pool's
`MemberLost`), its streams that never opened end at once with `coalescer_lost`, and so does
one subscribed to later: their lease request was queued at a Pacer, and if that Pacer died
with the shard nobody alive knows the flight, so nobody would open or fail the stream
(docs/reliability.md, "Process crashes"). Streams that opened go on: their call runs here.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from protocols import auth, stream_ids
from protocols import events as ev
from protocols import messages as m
from protocols.effects import Send

# How long a dead shard incarnation is remembered, for a subscription that arrives after
# its death (the edge got the shard's Admitted as it died: it subscribes within a hop or
# two). Not for ever: an address is reused once the kernel's ports wrap around, and a new
# shard on a remembered address would see its queued streams ended at subscription.
LOST_OWNER_KEPT_S = 60.0
LOST_OWNERS_KEPT = 1024  # and at most this many (a few per crash)


def orphan_after(max_wait_s: float) -> float:
    """The hub's `orphan_s` for a Pacer that queues a call at most `max_wait_s`
    (PACER_MAX_WAIT_MS): a stream subscribed to while its call waits for a lease is not an
    orphan before that wait is over, plus a minute for the hops and the call's start."""
    return max_wait_s + 60.0


@dataclass
class HubStream:
    stream_id: str
    created_at: float
    events: list = field(default_factory=list)
    subscribers: dict = field(default_factory=dict)  # peer -> None (an ordered set)
    finished_at: float | None = None
    opened: bool = False  # the Pool started (or failed) the upstream call for it
    has_delta: bool = False  # its first delta is published (the host writes frames up to it at once)


class HubLogic:
    """`secret` is the cluster secret (actors/secret.py): it checks the Coalescer's tickets."""

    def __init__(self, secret: bytes, linger_s: float = 30.0, orphan_s: float = 120.0):
        if not secret:
            raise ValueError("the stream hub needs the cluster secret")
        self.secret = secret
        self.linger_s, self.orphan_s = linger_s, orphan_s
        self.refused_subscribes = 0
        self.streams: dict[str, HubStream] = {}
        self.peers: dict[Hashable, dict[str, None]] = {}  # peer -> the streams it subscribed to
        # Owner tags of dead shard incarnations -> (the error their unopened streams end
        # with, when it was learnt), oldest first.
        self.lost_owners: dict[str, tuple[dict, float]] = {}

    # --- publishing (the Pool's upstream calls) ---------------------------------------------
    def publish(self, stream_id: str, events: list[dict], now: float) -> list[Send]:
        """Append events to the stream; -> one frame per subscriber (the same message)."""
        stream = self._stream(stream_id, now)
        if stream.finished_at is not None or not events:
            return []
        seq = len(stream.events)
        stream.events.extend(events)
        if not stream.has_delta:
            stream.has_delta = any(event.get("type") == ev.DELTA for event in events)
        if ev.is_terminal(events[-1]):
            stream.finished_at = now
        if not stream.subscribers:
            return []
        frame = m.StreamData(stream_id, seq, events)
        return [Send(peer, frame) for peer in stream.subscribers]

    def mark_open(self, stream_id: str, now: float) -> None:
        """The Pool started (or failed) the upstream call: no orphan timeout for it."""
        self._stream(stream_id, now).opened = True

    def is_finished(self, stream_id: str) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and stream.finished_at is not None

    def last_event(self, stream_id: str) -> dict | None:
        stream = self.streams.get(stream_id)
        return stream.events[-1] if stream is not None and stream.events else None

    def subscriber_count(self, stream_id: str) -> int:
        stream = self.streams.get(stream_id)
        return len(stream.subscribers) if stream else 0

    # --- the edges ------------------------------------------------------------------------
    def handle(self, msg, peer: Hashable, edge_id: str | None, now: float) -> list[Send]:
        """A message from `peer`, an edge that proved `edge_id` in its handshake."""
        if isinstance(msg, m.Subscribe):
            if not auth.ticket_ok(self.secret, msg.stream_id, edge_id, msg.ticket):
                self.refused_subscribes += 1
                return [
                    Send(
                        peer,
                        m.SubscribeRefused(msg.stream_id, "forbidden", "this edge was not admitted to this stream"),
                    )
                ]
            stream = self._stream(msg.stream_id, now)
            stream.subscribers[peer] = None
            self.peers.setdefault(peer, {})[msg.stream_id] = None
            replay = [Send(peer, m.StreamData(msg.stream_id, 0, list(stream.events)))] if stream.events else []
            # Admitted by a shard that has died since (its answer crossed its death): the
            # stream will never open.
            lost = self._lost_owner_of(stream, now)
            return replay + (self.publish(stream.stream_id, [dict(lost)], now) if lost is not None else [])
        if isinstance(msg, m.Unsubscribe):
            stream = self.streams.get(msg.stream_id)
            if stream:
                stream.subscribers.pop(peer, None)
            self.peers.get(peer, {}).pop(msg.stream_id, None)
            return []
        reason = msg.reason if isinstance(msg, m.Invalid) else f"unexpected {type(msg).__name__}"
        return [Send(peer, m.ErrorReply("bad_message", reason))]

    def drop(self, peer: Hashable) -> None:
        """The peer's connection is gone: it subscribes to nothing any more."""
        for stream_id in self.peers.pop(peer, {}):
            stream = self.streams.get(stream_id)
            if stream:
                stream.subscribers.pop(peer, None)

    # --- crashes --------------------------------------------------------------------------
    def owner_lost(self, role: str, owner: str, now: float) -> list[Send]:
        """The shard `role`'s incarnation at address `owner` died: each of its streams that
        never opened ends with `coalescer_lost` (as the Pacer fails the requests such a
        shard had queued, when it lives), its subscribers now, a later subscriber at once."""
        error = ev.error("coalescer_lost", f"{role} restarted; this request was lost with it, retry it")
        tag = stream_ids.owner_tag(self.secret, owner)
        self.lost_owners.pop(tag, None)  # told again: remembered from now
        self.lost_owners[tag] = (error, now)
        for old, (_, lost_at) in list(self.lost_owners.items()):
            if len(self.lost_owners) > LOST_OWNERS_KEPT or lost_at + LOST_OWNER_KEPT_S < now:
                del self.lost_owners[old]
        out: list[Send] = []
        for stream in list(self.streams.values()):
            lost = self._lost_owner_of(stream, now)
            if lost is not None:
                out += self.publish(stream.stream_id, [dict(lost)], now)
        return out

    def _lost_owner_of(self, stream: HubStream, now: float) -> dict | None:
        """The error a stream ends with because its owner died (None: it does not)."""
        if stream.opened or stream.finished_at is not None:
            return None
        tag = stream_ids.tag_of(stream.stream_id)
        error, lost_at = self.lost_owners.get(tag, (None, 0.0)) if tag is not None else (None, 0.0)
        return error if error is not None and now <= lost_at + LOST_OWNER_KEPT_S else None

    # --- time -----------------------------------------------------------------------------
    def sweep(self, now: float) -> list[Send]:
        """Drop finished streams after their linger; end orphans with an error."""
        out: list[Send] = []
        for stream in list(self.streams.values()):
            if stream.finished_at is not None and now >= stream.finished_at + self.linger_s:
                del self.streams[stream.stream_id]
                for peer in stream.subscribers:
                    self.peers.get(peer, {}).pop(stream.stream_id, None)
            elif self._orphan_due(stream) is not None and now >= stream.created_at + self.orphan_s:
                out += self.publish(
                    stream.stream_id, [ev.error("stream_not_started", "the upstream call never started")], now
                )
        return out

    def next_due(self) -> float | None:
        """When `sweep` next has something to do (None: nothing pending). The Pool's host
        sweeps once a second anyway; the simulation sets a timer for exactly this."""
        dues = [
            due
            for stream in self.streams.values()
            for due in (
                None if stream.finished_at is None else stream.finished_at + self.linger_s,
                self._orphan_due(stream),
            )
            if due is not None
        ]
        return min(dues, default=None)

    def _orphan_due(self, stream: HubStream) -> float | None:
        if stream.opened or stream.finished_at is not None:
            return None
        return stream.created_at + self.orphan_s

    def _stream(self, stream_id: str, now: float) -> HubStream:
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = HubStream(stream_id, now)
        return stream

    def state(self) -> dict:
        return {
            "refused_subscribes": self.refused_subscribes,
            "streams": len(self.streams),
            "open_streams": sum(1 for s in self.streams.values() if s.finished_at is None),
            "lost_owners": len(self.lost_owners),
        }
