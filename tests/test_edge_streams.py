"""The edge's local flights, driven directly with a stand-in bridge and hub: clients
that give up while their flight is admitted, rejections shared by every waiting client,
replays without duplicates. (The real thing runs in tests/test_coalescing.py.)"""

from __future__ import annotations

import asyncio

import pytest

from edge.streams import LocalStreams, Rejection
from protocols import events as ev
from protocols import messages as m

pytestmark = pytest.mark.unit

KEY = "ab" * 32  # a coalescing key is a SHA-256 hex digest


class GatedBridge:
    """Answers Submit only when the test opens the gate."""

    def __init__(self, answer):
        self.answer, self.gate, self.asked, self.told = answer, asyncio.Event(), [], []

    async def ask(self, to, msg, timeout=5.0):
        self.asked.append(msg)
        await self.gate.wait()
        return self.answer(msg)

    async def tell(self, to, msg):
        self.told.append(msg)


class RecordingHub:
    def __init__(self):
        self.listeners, self.unsubscribed, self.tickets = {}, [], {}

    async def subscribe(self, stream_id, ticket, on_events, hub=""):
        self.listeners[stream_id] = on_events
        self.tickets[stream_id] = ticket

    def unsubscribe(self, stream_id, on_events, hub=""):
        if self.listeners.get(stream_id) is on_events:
            del self.listeners[stream_id]
        self.unsubscribed.append(stream_id)


def drain(sub) -> list:
    """Everything queued for a subscriber so far."""
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


def admitted(msg):
    return m.Admitted(msg.request_id, "s-1", "leader", ticket=f"ticket-for-{msg.edge_id}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


async def _settle(streams: LocalStreams):
    await asyncio.sleep(0)
    await asyncio.gather(*list(streams._tasks))


def test_a_client_leaving_during_admission_does_not_strand_the_others():
    async def scenario():
        bridge, hub = GatedBridge(admitted), RecordingHub()
        streams = LocalStreams(bridge, hub, "edge-1", 2)
        first = asyncio.create_task(streams.join("a", "simulated", "m", {}, KEY, 0.0))
        second = asyncio.create_task(streams.join("b", "simulated", "m", {}, KEY, 0.0))
        await asyncio.sleep(0)
        first.cancel()  # the submitter's client disconnects before the Coalescer answers
        bridge.gate.set()
        sub = await second
        await _settle(streams)
        assert first.cancelled() and sub.role == "follower"
        assert len(bridge.asked) == 1 and bridge.told == []  # one Submit, no Cancel
        hub.listeners["s-1"](0, [ev.delta("x")])
        assert sub.queue.get_nowait() == ev.delta("x")

    run(scenario())


def test_everyone_leaving_during_admission_gives_the_reference_back():
    async def scenario():
        bridge, hub = GatedBridge(admitted), RecordingHub()
        streams = LocalStreams(bridge, hub, "edge-1", 2)
        joins = [asyncio.create_task(streams.join(r, "simulated", "m", {}, KEY, 0.0)) for r in "ab"]
        await asyncio.sleep(0)
        for join in joins:
            join.cancel()
        bridge.gate.set()
        await _settle(streams)
        assert [type(t) for t in bridge.told] == [m.Cancel] and bridge.told[0].stream_id == "s-1"
        assert hub.listeners == {} and streams.by_key == {}

    run(scenario())


def test_a_rejection_reaches_every_waiting_client():
    async def scenario():
        bridge = GatedBridge(lambda msg: m.Rejected(msg.request_id, 429, "pacer_queue_full", "full", 3.0))
        streams = LocalStreams(bridge, RecordingHub(), "edge-1", 2)
        joins = [asyncio.create_task(streams.join(r, "simulated", "m", {}, KEY, 0.0)) for r in "abc"]
        await asyncio.sleep(0)
        bridge.gate.set()
        results = await asyncio.gather(*joins, return_exceptions=True)
        assert all(isinstance(r, Rejection) and r.status == 429 and r.retry_after_s == 3.0 for r in results)
        assert streams.by_key == {} and streams.by_request == {}

    run(scenario())


def test_a_late_joiner_gets_the_replay_and_the_early_ones_no_duplicates():
    async def scenario():
        bridge, hub = GatedBridge(admitted), RecordingHub()
        bridge.gate.set()
        streams = LocalStreams(bridge, hub, "edge-1", 2)
        early = await streams.join("a", "simulated", "m", {}, KEY, 0.0)
        hub.listeners["s-1"](0, [ev.delta("one "), ev.delta("two ")])
        late = await streams.join("b", "simulated", "m", {}, KEY, 0.0)
        hub.listeners["s-1"](2, [ev.delta("three"), ev.done("stop")])
        assert drain(early) == drain(late) == [ev.delta("one "), ev.delta("two "), ev.delta("three"), ev.done("stop")]
        assert early.role == "leader" and late.role == "follower" and len(bridge.asked) == 1
        assert hub.tickets == {"s-1": "ticket-for-edge-1"}  # the hub sees the Coalescer's ticket

    run(scenario())


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_coalescer_flag_decides_local_joining(coalesce):
    async def scenario():
        bridge = GatedBridge(lambda msg: m.Admitted(msg.request_id, f"s-{msg.request_id}", "leader", None, coalesce))
        bridge.gate.set()
        streams = LocalStreams(bridge, RecordingHub(), "edge-1", 2)
        await streams.join("a", "simulated", "m", {}, KEY, 0.0)
        await streams.join("b", "simulated", "m", {}, KEY, 0.0)
        assert len(bridge.asked) == (1 if coalesce else 2)

    run(scenario())


def test_frames_of_an_earlier_subscription_are_dropped_by_seq():
    async def scenario():
        bridge, hub = GatedBridge(admitted), RecordingHub()
        bridge.gate.set()
        streams = LocalStreams(bridge, hub, "edge-1", 2)
        sub = await streams.join("a", "simulated", "m", {}, KEY, 0.0)
        frame = hub.listeners["s-1"]
        frame(5, [ev.delta("stale")])  # from before: our replay has not arrived yet
        frame(0, [ev.delta(w) for w in ("a", "b", "c")])  # the replay
        frame(1, [ev.delta("b"), ev.delta("c"), ev.delta("d")])  # overlaps what we have
        frame(4, [ev.done("stop")])
        assert drain(sub) == [ev.delta(w) for w in "abcd"] + [ev.done("stop")]

    run(scenario())


def test_a_second_answer_to_a_submit_gives_its_reference_back():
    # A Submit asked again of a replaced shard may be answered twice (edge/bridge.py): the
    # stray Admitted holds a reference at its shard, which the edge returns with a Cancel;
    # a stray replaying a remembered error holds none, so nothing is sent for it.
    async def scenario():
        bridge = GatedBridge(admitted)
        streams = LocalStreams(bridge, RecordingHub(), "edge-1", 2)
        streams.stray_answer("coalescer:1", m.Admitted("r1", "s-9", "leader", ticket="t"))
        streams.stray_answer("coalescer:1", m.Admitted("r2", "s-8", "follower", ev.error("upstream_error", "x")))
        streams.stray_answer("coalescer:1", m.Rejected("r3", 429, "pacer_queue_full", "full"))
        await _settle(streams)
        assert bridge.told == [m.Cancel("s-9", "edge-1", bridge.told[0].requested_at)]

    run(scenario())


def test_the_bridge_takes_an_answer_naming_another_request_as_a_stray():
    from edge.bridge import _answers_another

    assert _answers_another(m.Submit("r1", KEY, "p", "m", {}, "e", 0.0), m.Admitted("r2", "s-1", "leader"))
    assert not _answers_another(m.Submit("r1", KEY, "p", "m", {}, "e", 0.0), m.Admitted("r1", "s-1", "leader"))
    assert not _answers_another(m.GetDirectory(), m.Directory({}, [], {}, 0))


def test_clients_waiting_on_a_flight_the_coalescer_will_not_share_ask_on_their_own():
    # The edge believed coalescing on and put "b" on "a"'s flight; the answer says it is
    # off, so "b" submits its own request and gets its own stream (edge/flights.py).
    async def scenario():
        bridge = GatedBridge(
            lambda msg: m.Admitted(msg.request_id, f"s-{msg.request_id}", "leader", None, False, ticket="t")
        )
        streams = LocalStreams(bridge, RecordingHub(), "edge-1", 2)
        joins = [asyncio.create_task(streams.join(r, "simulated", "m", {}, KEY, 0.0)) for r in "ab"]
        while not bridge.asked:  # run() bounds the wait
            await asyncio.sleep(0)
        assert [msg.request_id for msg in bridge.asked] == ["a"]
        bridge.gate.set()
        a, b = await asyncio.gather(*joins)
        assert [msg.request_id for msg in bridge.asked] == ["a", "b"]
        assert (a.flight.stream_id, a.role, b.flight.stream_id, b.role) == ("s-a", "leader", "s-b", "leader")

    run(scenario())


class SilentBridge(GatedBridge):
    """A Submit nobody answers in time (a frozen Coalescer, or a Coalescer waiting on a
    frozen Pacer): the bridge's timeout."""

    async def ask(self, to, msg, timeout=5.0):
        from edge.bridge import BridgeTimeout

        self.asked.append((msg, timeout))
        raise BridgeTimeout(f"no answer to {type(msg).__name__} within {timeout:g} s")


def test_a_submit_nobody_answers_says_the_request_was_not_admitted_in_time():
    async def scenario():
        bridge = SilentBridge(admitted)
        streams = LocalStreams(bridge, RecordingHub(), "edge-1", 2)
        results = await asyncio.gather(
            *(streams.join(r, "simulated", "m", {}, KEY, 0.0) for r in "ab"), return_exceptions=True
        )
        assert [timeout for _, timeout in bridge.asked] == [10.0]
        for r in results:
            assert isinstance(r, Rejection) and (r.status, r.code) == (503, "gateway_unavailable"), r
            assert r.message == (
                "the request was not admitted within 10 s: the Coalescer or the account's Pacer did not answer in time"
            )
        assert streams.by_key == {} and streams.by_request == {}

    run(scenario())


def test_a_submit_that_fails_otherwise_still_names_the_coalescer():
    from edge.bridge import BridgeError
    from edge.streams import unanswered_submit

    message = unanswered_submit(BridgeError("no actor plays 'coalescer:0'"))
    assert message == "the coalescer did not answer: no actor plays 'coalescer:0'"


def test_the_bridge_raises_its_timeout_when_no_answer_comes():
    from edge.bridge import ActorBridge, BridgeTimeout

    class Quiet:  # a Thespian context whose asks and listens all time out
        def ask(self, address, msg, timeout):
            return None

        def listen(self, timeout):
            return None

    bridge = ActorBridge(0, workers=1)
    bridge._context = Quiet  # type: ignore[method-assign]
    try:
        with pytest.raises(BridgeTimeout, match="no answer to GetDirectory within 0.01 s") as info:
            bridge._ask_address("addr", m.GetDirectory(), 0.01)
        assert info.value.code == "unavailable"  # callers that check the code see what they did
    finally:
        bridge.close()
