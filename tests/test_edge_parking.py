"""Parked clients (resumable streams) in the edge's flight logic, on a fake clock: a
parked client keeps the flight's reference until its deadline, a resume takes it back,
and only an expiry (or the last client leaving) sends the Cancel."""

from __future__ import annotations

import pytest

from edge.flights import EdgeFlights, Push, Wake
from protocols import events as ev
from protocols import messages as m
from protocols.effects import Send

pytestmark = pytest.mark.unit

KEY = "cd" * 32


class Client:
    """An opaque client handle (hashable by identity)."""


def admitted_flight(flights: EdgeFlights, client, request_id="r1", now=0.0):
    submit = m.Submit(request_id, KEY, "simulated", "sim-1", {"messages": []}, "edge-1", now)
    flights.join(client, submit, now)
    flights.answer(request_id, m.Admitted(request_id, "s-1", "leader", ticket="t"), now)
    flight = flights.flight_of[client][1]
    flights.listened(flight)
    return flight


def cancels(effects) -> list:
    return [e for e in effects if isinstance(e, Send) and isinstance(e.msg, m.Cancel)]


def test_a_parked_client_keeps_the_reference_until_its_deadline_then_cancels():
    flights, client = EdgeFlights("edge-1", 1), Client()
    flight = admitted_flight(flights, client)
    assert flights.park(client, now=10.0, grace_s=5.0) == [Wake(client, 15.0)]
    assert flights.is_parked(client) and client in flight.clients
    # still a client: the stream's events keep coming to it while it is away
    assert flights.frame(flight, 0, [ev.started(0.0, 0.0), ev.delta("a")], now=11.0)[0] == Push(
        client, [ev.started(0.0, 0.0), ev.delta("a")]
    )
    assert flights.expire(client, now=14.9) is None  # not due yet
    effects = flights.expire(client, now=15.0)
    assert [c.msg.stream_id for c in cancels(effects)] == ["s-1"]
    assert not flights.is_parked(client) and client not in flights.flight_of and "r1" not in flights.by_request


def test_a_resume_before_the_deadline_takes_the_client_back_and_nothing_is_cancelled():
    flights, client = EdgeFlights("edge-1", 1), Client()
    flight = admitted_flight(flights, client)
    flights.park(client, now=10.0, grace_s=5.0)
    assert flights.resume(client, now=12.0) is True
    assert flights.expire(client, now=15.0) is None  # the old deadline is void
    assert not flights.is_parked(client) and client in flight.clients and flights.by_request["r1"] is client
    assert cancels(flights.leave(client, now=20.0))  # leaving later still gives the reference back


def test_a_resume_after_the_deadline_is_refused():
    flights, client = EdgeFlights("edge-1", 1), Client()
    admitted_flight(flights, client)
    flights.park(client, now=10.0, grace_s=5.0)
    assert flights.resume(client, now=15.5) is False
    assert cancels(flights.expire(client, now=15.5))


def test_an_expiry_with_other_clients_on_the_flight_cancels_nothing():
    flights, parked, other = EdgeFlights("edge-1", 1), Client(), Client()
    flight = admitted_flight(flights, parked)
    flights.join(other, m.Submit("r2", KEY, "simulated", "sim-1", {"messages": []}, "edge-1", 1.0), 1.0)
    flights.park(parked, now=2.0, grace_s=1.0)
    assert flights.expire(parked, now=3.0) == []
    assert list(flight.clients) == [other]


def test_a_finished_flight_keeps_its_events_for_a_parked_client():
    flights, client = EdgeFlights("edge-1", 1), Client()
    flight = admitted_flight(flights, client)
    flights.park(client, now=1.0, grace_s=5.0)
    flights.frame(flight, 0, [ev.started(0.0, 0.0), ev.delta("a"), ev.done("stop")], now=2.0)
    assert flight.finished and flights.resume(client, now=3.0)
    assert [e["type"] for e in flight.events] == [ev.STARTED, ev.DELTA, ev.DONE]


def test_leaving_while_parked_ends_the_parking():
    flights, client = EdgeFlights("edge-1", 1), Client()
    admitted_flight(flights, client)
    flights.park(client, now=1.0, grace_s=5.0)
    assert cancels(flights.leave(client, now=2.0))
    assert not flights.is_parked(client) and flights.expire(client, now=10.0) is None


def test_parking_a_client_that_already_left_does_nothing():
    flights, client = EdgeFlights("edge-1", 1), Client()
    admitted_flight(flights, client)
    flights.leave(client, now=1.0)
    assert flights.park(client, now=1.0, grace_s=5.0) == [] and not flights.is_parked(client)
