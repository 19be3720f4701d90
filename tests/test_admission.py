"""`Edge.admit` and the Admission it returns, driven directly: the real Edge, LocalStreams,
key table and record sender, with a stand-in bridge and hub at the actors' side (the
whole path over HTTP runs in tests/test_gateway.py, test_openai_compat.py, test_threads.py).

Admit's refusals are one typed Rejection each (status, code, message, Retry-After) and
leave nothing held; an admitted client's end — however its front end ends — leaves the
flight, frees the key's stream slot, charges its tokens and records the request."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from edge.access_log import STREAM_OUTCOME
from edge.api_keys import hash_key
from edge.app import Edge
from edge.records import RecordSender
from edge.rejections import Rejection
from edge.streams import LocalStreams
from protocols import config
from protocols import events as ev
from protocols import messages as m

pytestmark = pytest.mark.unit

BODY = {"messages": [{"role": "user", "content": "x" * 40}]}  # 10 tokens by the estimate


class Bridge:
    """Answers every Submit with `answer(msg)` at once; keeps what was told."""

    def __init__(self, answer):
        self.answer, self.told = answer, []

    async def ask(self, to, msg, timeout=5.0):
        return self.answer(msg)

    async def tell(self, to, msg):
        self.told.append(msg)


class Hub:
    def __init__(self):
        self.listeners, self.unsubscribed = {}, []

    async def subscribe(self, stream_id, ticket, on_events, hub=""):
        self.listeners[stream_id] = on_events

    def unsubscribe(self, stream_id, on_events, hub=""):
        self.listeners.pop(stream_id, None)
        self.unsubscribed.append(stream_id)


def admitted(msg):
    return m.Admitted(msg.request_id, "s-1", "leader", ticket="t")


def make_edge(tmp_path, answer=admitted) -> Edge:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"id": "solo", "sha256": hash_key("sk-solo"), "concurrency": 1, "models": ["simulated/sim-1"]},
                ]
            }
        )
    )
    edge = Edge(config.load({"SLUICE_ACTOR_PORT": "1", "SLUICE_API_KEYS_FILE": str(keys), "COALESCE_SCOPE": "global"}))
    edge.bridge = Bridge(answer)
    edge.hub = Hub()
    edge.streams = LocalStreams(edge.bridge, edge.hub, edge.edge_id, 2)
    edge.records = RecordSender(edge.bridge, edge.edge_id)  # not started: records stay pending
    return edge


async def refused(edge: Edge, provider=None, model=None, key_id="solo") -> Rejection:
    with pytest.raises(Rejection) as info:
        await edge.admit(provider, model, BODY, None, True, key_id)
    return info.value


async def connected():
    await asyncio.Event().wait()  # the client stays: no http.disconnect
    return {"type": "http.disconnect"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_admit_refuses_with_one_typed_rejection_and_holds_nothing(tmp_path):
    async def scenario():
        edge = make_edge(tmp_path)
        unknown = await refused(edge, provider="nope")
        assert (unknown.status, unknown.code) == (422, "invalid_request") and "simulated" in unknown.message
        missing = await refused(edge, provider="openai")
        assert (missing.status, missing.code) == (
            400,
            "provider_not_configured",
        ) and "OPENAI_API_KEY" in missing.message
        forbidden = await refused(edge, model="other-model")
        assert (forbidden.status, forbidden.code, forbidden.type) == (403, "model_not_allowed", "invalid_request_error")
        assert forbidden.headers() == {}

        first = await edge.admit(None, None, BODY, None, True, "solo")  # takes the key's one stream
        busy = await refused(edge)
        assert (busy.status, busy.code) == (429, "rate_limit_exceeded") and busy.headers()["Retry-After"] == "1"
        first.close()

        edge.set_draining(True)
        draining = await refused(edge)
        assert (draining.status, draining.code, draining.headers()) == (503, "draining", {"Retry-After": "5"})
        assert edge.keys.usage["solo"].open == 0 and edge.streams.by_request == {}

    run(scenario())


def test_a_refusal_by_the_pacer_is_recorded_and_frees_the_key(tmp_path):
    async def scenario():
        edge = make_edge(tmp_path, lambda msg: m.Rejected(msg.request_id, 429, "pacer_queue_full", "full", 3.0))
        full = await refused(edge)
        assert (full.status, full.code, full.headers()) == (429, "pacer_queue_full", {"Retry-After": "3"})
        usage = edge.keys.usage["solo"]
        assert usage.open == 0 and usage.outcomes == {"rejected": 1} and usage.tokens_total == 0
        [record] = edge.records.pending
        assert (record["outcome"], record["error_code"], record["key_id"]) == ("rejected", "pacer_queue_full", "solo")
        assert (record["provider"], record["model"]) == ("simulated", "sim-1")
        assert edge.streams.by_request == {} and edge.streams.by_key == {}

    run(scenario())


def test_a_front_end_that_fails_mid_render_still_releases_the_flight_and_charges_the_key(tmp_path):
    async def scenario():
        edge = make_edge(tmp_path)
        admission = await edge.admit(None, None, BODY, None, True, "solo")
        # the Pool's first-byte stamp is not the client's TTFT: that ends when this edge writes
        started = ev.started(admission.sub.received_at + 0.05, 1.0, provider_ttft_ms=30.0, model="sim-fb")
        edge.hub.listeners["s-1"](0, [started, ev.delta("y" * 40)])
        scope: dict = {}
        before = time.time()
        with pytest.raises(RuntimeError):
            async with admission.serving(scope, connected):
                async for event in admission.events():
                    if event["type"] == ev.DELTA:
                        raise RuntimeError("a renderer bug")
        after = time.time()
        assert admission.closed and before <= admission.first_byte_at <= after
        assert admission.ttft_ms == round((admission.first_byte_at - admission.sub.received_at) * 1000.0, 3)
        # the flight: left, and this edge's reference given back (it was the last client)
        assert edge.streams.by_request == {} and edge.streams.idle.is_set()
        await asyncio.gather(*list(edge.streams._tasks))
        assert [type(t) for t in edge.bridge.told] == [m.Cancel] and edge.hub.unsubscribed == ["s-1"]
        # the key: its stream slot free, the prompt's and the delivered text's tokens charged
        usage = edge.keys.usage["solo"]
        assert usage.open == 0 and usage.tokens_total == 20 and usage.outcomes == {"error": 1}
        # the request record and the access log's outcome
        [record] = edge.records.pending
        assert (record["outcome"], record["error_code"], record["key_id"]) == ("error", "disconnected", "solo")
        assert record["ttft_ms"] == admission.ttft_ms
        # the leader's provider TTFT, and who answered (the fallback model) label the record
        assert (record["provider_ttft_ms"], record["provider"], record["model"]) == (30.0, "simulated", "sim-fb")
        logged = scope["state"][STREAM_OUTCOME]
        assert logged["outcome"] == "error"
        assert (logged["ttft_ms"], logged["provider_ttft_ms"], logged["model"]) == (admission.ttft_ms, 30.0, "sim-fb")
        admission.close()  # closing again changes nothing
        assert len(edge.records.pending) == 1 and usage.outcomes == {"error": 1}
        second = await edge.admit(None, None, BODY, None, True, "solo")  # the slot is free again
        second.close()

    run(scenario())


def test_events_end_with_the_terminal_or_when_the_client_leaves(tmp_path):
    async def scenario():
        edge = make_edge(tmp_path)
        done = await edge.admit(None, None, BODY, None, False, "solo")
        edge.hub.listeners["s-1"](0, [ev.delta("a"), ev.delta("b"), ev.done("stop")])
        async with done.serving({}, connected):
            seen = [event["type"] async for event in done.events()]
        assert seen == ["delta", "delta", "done"] and done.outcome == {"outcome": "done", "error_code": None}
        assert edge.keys.usage["solo"].outcomes == {"done": 1}

        async def gone():
            return {"type": "http.disconnect"}

        left = await edge.admit(None, None, BODY, None, False, "solo")
        async with left.serving({}, gone):
            assert [event async for event in left.events()] == []
        assert left.outcome == {"outcome": "cancelled", "error_code": "disconnected"}

        stopped = await edge.admit(None, None, BODY, None, False, "solo")
        edge.begin_shutdown()
        async with stopped.serving({}, connected):
            assert [event["code"] async for event in stopped.events()] == ["shutting_down"]
        assert stopped.outcome == {"outcome": "error", "error_code": "shutting_down"}
        assert edge.streams.by_request == {}

    run(scenario())


def test_a_follower_without_fan_out_gets_the_whole_answer_in_one_delta_before_the_end(tmp_path):
    async def scenario():
        edge = make_edge(tmp_path, lambda msg: m.Admitted(msg.request_id, "s-1", "follower", fanout=False, ticket="t"))
        admission = await edge.admit(None, None, BODY, None, True, None)
        assert admission.role == "follower" and admission.stream_id == "s-1"
        started = ev.started(admission.sub.received_at + 0.01, 2.5, attempts=2, provider_ttft_ms=9.0, key="#2")
        edge.hub.listeners["s-1"](0, [started, ev.delta("a"), ev.delta("b"), ev.usage(1, 2), ev.done("stop")])
        async with admission.serving({}, connected):
            seen = [event async for event in admission.events()]
        assert [e["type"] for e in seen] == ["started", "usage", "delta", "done"] and seen[2]["delta"] == "ab"
        assert (admission.queue_wait_ms, admission.attempts, admission.served) == (2.5, 2, {"key": "#2"})
        assert admission.provider_ttft_ms is None  # a follower did not wait for the provider's whole TTFT
        assert admission.ending == {"finish_reason": "stop"}

    run(scenario())


def test_batches_ping_after_idle_s_of_waiting_and_not_while_the_writer_is_busy():
    # One keepalive timer per stream (edge/admission.py _IdleTimer), not one per wait: an
    # empty batch comes only once the wait for events has lasted idle_s; time the front end
    # spends writing a batch does not count, and the timer is gone when the stream ends.
    from edge.admission import Admission
    from edge.streams import Subscriber

    async def scenario():
        loop = asyncio.get_running_loop()
        sub = Subscriber("r-1", "leader", time.time(), "openai", "gpt-x")
        admission = Admission(sub, dict(BODY), asyncio.Event(), release=lambda a, o: None)
        batches = admission.batches(0.05)
        started = loop.time()
        assert await batches.__anext__() == []  # nothing for idle_s: a keepalive
        assert loop.time() - started >= 0.045
        sub.push([ev.delta("a")])
        assert [e["type"] for e in await batches.__anext__()] == ["delta"]
        await asyncio.sleep(0.12)  # the writer is busy for more than idle_s: no idle wait
        waited = loop.time()
        assert await batches.__anext__() == []  # the keepalive after a fresh wait of idle_s
        assert loop.time() - waited >= 0.045
        await asyncio.sleep(0.12)
        sub.push([ev.delta("b")])
        assert [e["type"] for e in await batches.__anext__()] == ["delta"]  # no empty batch first
        sub.push([ev.delta("c"), ev.done("stop", None)])
        assert [e["type"] for e in await batches.__anext__()] == ["delta", "done"]
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()
        assert sub.queue.empty()
        # the stream ended: its timer is cancelled (asyncio's own loop here, whose
        # `_scheduled` lists the timers), so nothing of it stays on the loop
        assert not [h for h in loop._scheduled if not h.cancelled() and "_IdleTimer" in repr(h)]

    asyncio.run(scenario())
