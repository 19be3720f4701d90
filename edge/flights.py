"""The edge's flights: which local clients share which upstream stream, and what each owes.

Plain logic, no I/O and no clock (the caller passes `now`): `edge/streams.py`'s
`LocalStreams` hosts it on the edge's asyncio loop (futures, the bridge, the hub client),
and the simulation (`sim/harness.py`) runs the same class for each simulated edge, so a
fault here breaks chaos seeds too.

The first client for a key on this edge process creates a flight and one `Submit` to the
key's Coalescer shard; identical requests arriving meanwhile join that flight and wait for
the same answer, later ones join it directly (while coalescing is on, as the Coalescer
last said in `Admitted.coalesce`). A flight keeps the events it received, so a client that
joins late gets the replay first, then the live events. A client leaving never disturbs
the others; when the last client of an unfinished flight leaves, the flight stops
listening and sends one `Cancel`, this edge's single reference at the Coalescer. Two
flights may end up on one stream (coalescing switched off, then on again): each listens
on its own (`edge/listeners.py`).

Clients are opaque handles of the host (hashable by identity). The effects:
`Send(shard, Submit | Cancel)`; `Listen(flight)` / `Unlisten(flight)` at the hub (the host
calls `listened` or `listen_failed` when the subscription is in place or failed, and feeds
the hub's frames to `frame`); `Push(client, events)`; `Admit(client, role, fanout)` (the
client's response may start: after any Push before it); `Refuse(client, rejected)`;
`Wake(client, at)` (call `expire(client, now)` at `at`).

A resumable client that disconnects is *parked* (`park`) instead of leaving: it stays a
client of its flight (the edge's reference at the Coalescer stays, the upstream call goes
on, its events keep arriving) until `resume` takes it back or its deadline passes
(`expire`: then it leaves, as it would have at the disconnect). See docs/architecture.md
"Resumable streams".
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from edge.listeners import new_events
from protocols import events as ev
from protocols import messages as m
from protocols import roles
from protocols.effects import Send
from protocols.keys import shard_of


@dataclass(eq=False)
class Flight:
    """This edge's view of one upstream stream, from the moment its first client asked."""

    key: str
    shard: str
    submit: m.Submit  # the Submit that created it (asked again of a replaced shard)
    stream_id: str | None = None
    ticket: str = ""
    submitter_role: str = "leader"
    fanout: bool = True
    events: list = field(default_factory=list)
    clients: dict = field(default_factory=dict)  # client -> None (an ordered set)
    admitted: bool = False  # clients may start (answered, and listening or replayed)
    refused: bool = False  # every client was refused
    finished: bool = False
    listening: bool = False  # a Listen not yet undone
    replayed: bool = False  # answered with a remembered error (the Coalescer's error TTL)
    listener: Any = None  # the host's handle for its hub subscription
    hub: str = ""  # the Pool (role) whose hub carries the stream (Admitted.hub; "": "pool")


@dataclass(frozen=True, slots=True)
class Listen:
    flight: Flight


@dataclass(frozen=True, slots=True)
class Unlisten:
    flight: Flight


@dataclass(frozen=True, slots=True)
class Push:
    client: Hashable
    events: list


@dataclass(frozen=True, slots=True)
class Admit:
    client: Hashable
    flight: Flight
    role: str
    fanout: bool


@dataclass(frozen=True, slots=True)
class Wake:
    """Call `expire(client, now)` at `at` (a parked client's deadline)."""

    client: Hashable
    at: float


@dataclass(frozen=True, slots=True)
class Refuse:
    client: Hashable
    rejected: m.Rejected


class EdgeFlights:
    def __init__(self, edge_id: str, shards: int):
        self.edge_id, self.shards = edge_id, shards
        self.by_key: dict[str, Flight] = {}  # flights new identical requests may join
        self.by_request: dict[str, Hashable] = {}  # request id -> its client, while open
        self.flight_of: dict[Hashable, tuple[m.Submit, Flight]] = {}  # client -> (its request, flight)
        self.submits: dict[str, Flight] = {}  # request id -> the flight its Submit awaits
        self.coalesce_enabled = True  # as the Coalescer last said (Admitted.coalesce)
        self.parked: dict[Hashable, float] = {}  # disconnected resumable client -> its deadline

    # --- clients ------------------------------------------------------------------------
    def join(self, client: Hashable, submit: m.Submit, now: float) -> list:
        """A new client with its request (a `Submit`, sent only if it starts a flight)."""
        key = submit.key
        flight = self.by_key.get(key) if key and self.coalesce_enabled else None
        out: list = []
        if flight is None or flight.finished:
            flight = Flight(key, roles.coalescer(shard_of(key, self.shards, submit.request_id)), submit)
            if key:
                self.by_key[key] = flight
            self.submits[submit.request_id] = flight
            out.append(Send(flight.shard, submit))
        flight.clients[client] = None
        self.flight_of[client] = (submit, flight)
        self.by_request[submit.request_id] = client
        if flight.events:
            out.append(Push(client, list(flight.events)))  # the replay; the rest arrives live
        if flight.admitted:
            out.append(self._admit(client))
        return out

    def leave(self, client: Hashable, now: float) -> list:
        """A client is gone (finished, disconnected, cancelled or refused)."""
        self.parked.pop(client, None)
        submit, flight = self.flight_of.pop(client, (None, None))
        if flight is None:
            return []
        if self.by_request.get(submit.request_id) is client:
            del self.by_request[submit.request_id]
        flight.clients.pop(client, None)
        if flight.clients or flight.finished:
            return []
        self._unlist(flight)  # a new identical request starts a new flight
        if flight.stream_id is not None:
            return self._abandon(flight, now)
        return []  # still being admitted: the answer gives the reference back

    def park(self, client: Hashable, now: float, grace_s: float) -> list:
        """A resumable client disconnected: it keeps its place (and its flight keeps the
        edge's reference) until `now + grace_s`; a finished flight's events stay for it too."""
        if client not in self.flight_of:
            return []
        at = now + grace_s
        self.parked[client] = at
        return [Wake(client, at)]

    def is_parked(self, client: Hashable) -> bool:
        return client in self.parked

    def resume(self, client: Hashable, now: float) -> bool:
        """A parked client is back before its deadline (True); False if it is not parked."""
        at = self.parked.get(client)
        if at is None or at < now:
            return False
        del self.parked[client]
        return True

    def expire(self, client: Hashable, now: float) -> list | None:
        """A parked client's deadline: if still parked and due, it leaves (the effects of
        `leave`, possibly the flight's Cancel); None when nothing is due (resumed meanwhile,
        or parked again with a later deadline)."""
        at = self.parked.get(client)
        if at is None or at > now:
            return None
        return self.leave(client, now)

    # --- the Coalescer's answers ------------------------------------------------------------
    def answer(self, request_id: str, reply, now: float) -> list:
        """The answer to the Submit of `request_id` (Admitted, Rejected, or anything else)."""
        flight = self.submits.pop(request_id, None)
        if flight is None:
            return []
        if isinstance(reply, m.Rejected):
            return self._refuse(flight, reply)
        if not isinstance(reply, m.Admitted):
            return self._refuse(
                flight, m.Rejected(request_id, 503, "gateway_unavailable", f"unexpected answer {type(reply).__name__}")
            )
        self.coalesce_enabled = reply.coalesce
        flight.stream_id, flight.ticket, flight.hub = reply.stream_id, reply.ticket, reply.hub
        flight.submitter_role, flight.fanout = reply.role, reply.fanout
        out: list = []
        if not reply.coalesce:
            self._unlist(flight)  # nobody else may join it, and those who did ask on their own
            out += self._separate(flight, now)
        if reply.error is not None:  # a failure still within its error TTL: replay it
            flight.replayed = True
            return out + self._on_events(flight, [reply.error]) + self._admit_all(flight)
        if not flight.clients:  # everyone left while we asked: give the reference back
            return out + self._abandon(flight, now)
        flight.listening = True
        return out + [Listen(flight)]

    def _separate(self, flight: Flight, now: float) -> list:
        """Coalescing is off: the clients that joined the flight while it was being
        admitted (this edge believed it on) each submit their own request."""
        out: list = []
        for client in [c for c in flight.clients if self.flight_of[c][0] is not flight.submit]:
            submit, _ = self.flight_of.pop(client)
            del flight.clients[client]
            out += self.join(client, submit, now)
        return out

    def failed(self, request_id: str, now: float) -> list:
        """Submitting failed inside this edge: every waiting client is refused (500)."""
        flight = self.submits.pop(request_id, None) or next(
            (f for s, f in self.flight_of.values() if s.request_id == request_id), None
        )
        if flight is None or flight.admitted or flight.refused:
            return []
        out = self._abandon(flight, now) if flight.stream_id is not None and not flight.finished else []
        return out + self._refuse(
            flight,
            m.Rejected(
                request_id, 500, "internal_error", "the gateway failed to submit this request; it has been logged"
            ),
        )

    def stray_answer(self, shard: str, answer, now: float) -> list:
        """A second answer to a Submit (asked again of a replaced shard): an `Admitted`
        holds a reference at the shard that sent it; give it back. One that replays a
        remembered error holds none (and a Cancel would take another's)."""
        if isinstance(answer, m.Admitted) and answer.error is None:
            return [Send(shard, m.Cancel(answer.stream_id, self.edge_id, now))]
        return []

    def unanswered(self) -> list[Flight]:
        """Flights whose Submit has no answer yet (to ask a replaced shard again)."""
        return list(self.submits.values())

    # --- the hub ----------------------------------------------------------------------------
    def listened(self, flight: Flight) -> list:
        """The hub subscription of `flight` is in place: its clients may start."""
        # Left (or lost) while subscribing: the subscription made meanwhile goes too.
        out = [Unlisten(flight)] if flight.finished and not flight.listening else []
        return out + self._admit_all(flight)

    def listen_failed(self, flight: Flight, message: str, now: float) -> list:
        flight.listening = False
        out = self._abandon(flight, now) if not flight.finished else []
        return out + self._refuse(flight, m.Rejected(flight.submit.request_id, 503, "gateway_unavailable", message))

    def frame(self, flight: Flight, seq: int | None, events: list[dict], now: float) -> list:
        """A hub frame for `flight`; `seq` None: the hub connection (or the stream) is
        lost, `events` carries the error. Only events the flight lacks are kept."""
        if seq is None:
            return self._hub_lost(flight, events, now)
        events = new_events(len(flight.events), seq, events)
        return self._on_events(flight, events) if events else []

    def _hub_lost(self, flight: Flight, events: list[dict], now: float) -> list:
        """The clients get the error event, and this edge gives its reference back (one
        Cancel), so that a flight nobody here can hear any more is not held in our name."""
        if flight.finished:
            return []
        flight.listening = False  # the hub client dropped the listener itself
        return self._on_events(flight, events) + [Send(flight.shard, m.Cancel(flight.stream_id, self.edge_id, now))]

    # --- inside -----------------------------------------------------------------------------
    def _on_events(self, flight: Flight, events: list) -> list:
        if flight.finished:
            return []
        flight.events.extend(events)
        out: list = [Push(client, events) for client in flight.clients]
        if any(ev.is_terminal(e) for e in events):
            flight.finished = True
            self._unlist(flight)
            out += self._unlisten(flight)
        return out

    def _admit(self, client: Hashable) -> Admit:
        submit, flight = self.flight_of[client]
        role = flight.submitter_role if submit is flight.submit else "follower"
        return Admit(client, flight, role, flight.fanout or role == "leader")

    def _admit_all(self, flight: Flight) -> list:
        flight.admitted = True
        return [self._admit(client) for client in flight.clients]

    def _refuse(self, flight: Flight, rejected: m.Rejected) -> list:
        self._unlist(flight)
        flight.finished = flight.refused = True
        return [Refuse(client, rejected) for client in flight.clients]

    def _abandon(self, flight: Flight, now: float) -> list:
        """Drop this edge's reference: one Cancel, the hub subscription gone."""
        flight.finished = True
        self._unlist(flight)
        return self._unlisten(flight) + [Send(flight.shard, m.Cancel(flight.stream_id, self.edge_id, now))]

    def _unlisten(self, flight: Flight) -> list:
        if not flight.listening:
            return []
        flight.listening = False
        return [Unlisten(flight)]

    def _unlist(self, flight: Flight) -> None:
        if self.by_key.get(flight.key) is flight:
            del self.by_key[flight.key]
