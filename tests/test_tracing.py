"""Traces (edge/tracing.py, issue 18): the span tree of a request, GenAI attributes on the
upstream call, a coalesced follower's link to its leader, and tracing off by default.

Real SSEStream, Admission and Subscriber objects are driven with stream events as the hub delivers
them; the spans go to the OpenTelemetry SDK's in-memory exporter (the `otel` test extra)."""

from __future__ import annotations

import asyncio
import time

import pytest

from edge import tracing
from edge.admission import Admission
from edge.flights import Flight
from edge.sse_stream import SSEStream
from edge.streams import Subscriber
from protocols import events as ev
from protocols import messages as m

pytestmark = pytest.mark.unit

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the OpenTelemetry SDK (extra 'otel') is not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402


@pytest.fixture
def exporter():
    memory = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    yield memory
    tracing.install(None)


async def _never_disconnect():
    await asyncio.Event().wait()


async def _serve(sub: Subscriber, events: list[dict]) -> None:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    admission = Admission(sub, {"messages": []}, asyncio.Event(), release=lambda a, o: None)
    stream = SSEStream(admission, keepalive_s=30.0)
    sub.push(events)
    await stream({"type": "http"}, _never_disconnect, send)
    assert sent[-1]["more_body"] is False


def _stream_events(provider_ttft_ms: float) -> list[dict]:
    first_byte = time.time()
    return [
        ev.started(first_byte, 40.0, 1, provider_ttft_ms=provider_ttft_ms, provider="openai", model="gpt-x"),
        ev.delta("hello"),
        ev.usage(7, 2),
        ev.done("stop", {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}),
    ]


def test_span_tree_genai_attributes_and_follower_link(exporter):
    async def scenario():
        submit = m.Submit("r-leader", "k", "openai", "gpt-x", {"messages": []}, "edge-1", time.time())
        flight = Flight(key="k", shard="coalescer:0", submit=submit, stream_id="st-1")
        received = time.time() - 0.5
        leader = Subscriber("r-leader", "leader", received, "openai", "gpt-x", flight=flight)
        follower = Subscriber("r-follower", "follower", received + 0.1, "openai", "gpt-x", flight=flight)
        await _serve(leader, _stream_events(provider_ttft_ms=300.0))
        await _serve(follower, _stream_events(provider_ttft_ms=300.0))

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    requests = {s.attributes["sluice.request_id"]: s for s in spans if s.name == "sluice.request"}
    assert set(requests) == {"r-leader", "r-follower"}
    leader = requests["r-leader"]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == leader.context.span_id]
    assert sorted(s.name for s in children) == ["chat gpt-x", "sluice.admission", "sluice.queue"]
    assert all(s.context.trace_id == leader.context.trace_id for s in children)
    by_name = {s.name: s for s in children}
    call = by_name["chat gpt-x"]
    assert call.kind.name == "CLIENT" and leader.kind.name == "SERVER"
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.provider.name"] == "openai"
    assert call.attributes["gen_ai.request.model"] == "gpt-x"
    assert call.attributes["gen_ai.usage.input_tokens"] == 7
    assert call.attributes["gen_ai.usage.output_tokens"] == 2
    assert tuple(call.attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    # the call went out provider TTFT before the first byte; the queue wait ended then
    first_byte = [e for e in leader.events if e.name == "first_byte"][0].timestamp
    assert first_byte - call.start_time == pytest.approx(300e6, abs=1e3)
    assert by_name["sluice.queue"].end_time == call.start_time
    assert by_name["sluice.queue"].end_time - by_name["sluice.queue"].start_time == pytest.approx(40e6, abs=1e3)
    admission = by_name["sluice.admission"]
    assert leader.start_time == admission.start_time <= admission.end_time <= leader.end_time
    assert leader.attributes["sluice.outcome"] == "done"
    # the follower: its own trace, no upstream call of its own, a link to the leader's span
    follower = requests["r-follower"]
    assert [lk.context.span_id for lk in follower.links] == [leader.context.span_id]
    assert not [
        s
        for s in spans
        if s.parent is not None and s.parent.span_id == follower.context.span_id and s.name.startswith("chat")
    ]


def test_error_outcome_sets_error_type(exporter):
    async def scenario():
        sub = Subscriber("r-err", "leader", time.time(), "openai", "gpt-x")
        await _serve(sub, [ev.error("upstream_5xx", "the provider failed")])

    asyncio.run(scenario())
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "sluice.request"]
    assert span.attributes["error.type"] == "upstream_5xx"
    assert span.status.status_code.name == "ERROR"


def test_off_by_default_and_without_endpoint():
    tracing.install(None)
    assert tracing.begin(object(), 0.0) is None
    assert tracing.setup_from_env({}) is False  # no OTEL_EXPORTER_OTLP_ENDPOINT: stays off
    assert tracing.begin(object(), 0.0) is None


def test_a_front_end_without_sse_is_traced_too(exporter):
    # The OpenAI non-streamed answer consumes the admission's events inside `serving`
    # (edge/openai_compat.py); the trace wraps `serving`, so it is traced like a stream.
    from edge.openai_compat import Completion

    async def scenario():
        sub = Subscriber("r-json", "leader", time.time() - 0.2, "openai", "gpt-x")
        admission = Admission(sub, {"messages": []}, asyncio.Event(), release=lambda a, o: None)
        completion = Completion(admission, "openai/gpt-x", int(time.time()))
        sub.push(_stream_events(provider_ttft_ms=100.0))
        async with admission.serving({"type": "http"}, _never_disconnect):
            async for event in admission.events():
                completion.add(event)
        assert completion.response().status_code == 200

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "sluice.request"]
    assert request.attributes["sluice.request_id"] == "r-json" and request.attributes["sluice.outcome"] == "done"
    (call,) = [s for s in spans if s.name == "chat gpt-x"]
    assert call.parent.span_id == request.context.span_id
    assert call.attributes["gen_ai.usage.output_tokens"] == 2
