"""Two local flights on one stream (the Coalescer joined two Submits of this edge, e.g.
while coalescing was being switched back on): both get every event, and one leaving
neither starves the other nor leaves the hub subscription behind. Real StreamHub and
HubClient over loopback TCP."""

from __future__ import annotations

import asyncio

import pytest

from actors.hub import StreamHub
from edge.dataplane import HubClient
from protocols import auth
from protocols import events as ev

pytestmark = pytest.mark.unit


async def until(predicate, timeout: float = 5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def test_two_listeners_on_one_stream_each_get_everything_and_leave_alone():
    async def main():
        secret = auth.new_secret()
        hub = StreamHub(secret)
        port = await hub.start("127.0.0.1")
        ticket = auth.ticket(secret, "s-1", "edge-1")

        async def locate():
            return "127.0.0.1", port

        client = HubClient(locate, secret, "edge-1")
        got_a, got_b = [], []

        def listener(got):  # like edge/streams.py: keep only what this flight lacks
            def on_frame(seq, events):
                if seq <= len(got):
                    got.extend(events[len(got) - seq :])

            return on_frame

        listener_a, listener_b = listener(got_a), listener(got_b)

        try:
            hub.mark_open("s-1")
            hub.publish("s-1", [ev.delta("one ")])
            await client.subscribe("s-1", ticket, listener_a)
            await client.subscribe("s-1", ticket, listener_b)
            await until(lambda: hub.subscriber_count("s-1") == 1 and got_a and got_b)
            hub.publish("s-1", [ev.delta("two ")])
            await until(lambda: len(got_a) == len(got_b) == 2)
            assert [e["delta"] for e in got_a] == [e["delta"] for e in got_b] == ["one ", "two "]

            client.unsubscribe("s-1", listener_a)  # one flight leaves: the other still listens
            hub.publish("s-1", [ev.delta("three")])
            await until(lambda: len(got_b) == 3)
            assert hub.subscriber_count("s-1") == 1 and len(got_a) == 2

            client.unsubscribe("s-1", listener_b)  # the last one: the hub hears it
            await until(lambda: hub.subscriber_count("s-1") == 0)
        finally:
            await client.close()
            await hub.stop()

    asyncio.run(main())


def test_a_lost_hub_ends_each_stream_with_an_event_of_its_own():
    from edge.dataplane import hub_lost

    first, second = hub_lost(), hub_lost()
    assert first == second == ev.error("hub_disconnected", "the stream hub went away mid-stream")
    first["_id"] = 3  # the edge numbers a client's events in place: no other stream sees it
    assert "_id" not in hub_lost()
