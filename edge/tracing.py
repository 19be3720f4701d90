"""OpenTelemetry traces of client requests, in the GenAI semantic conventions' terms.

Off by default, and then costless: `begin()` tests one global and returns None (about
40 ns a request, docs/benchmarks.md), and nothing of OpenTelemetry is imported. On when
the SDK is installed (`pip install 'sluice[otel]'`) and OTEL_EXPORTER_OTLP_ENDPOINT is
set: every edge process then exports over OTLP/HTTP (the exporter reads the standard
OTEL_* variables itself: endpoint, headers, timeout; OTEL_SERVICE_NAME names the service,
"sluice" by default). Tests install an in-memory exporter with `install()`.

One trace per client request, built at the edge, where the request lives, from the times
the edge learns:

  sluice.request (SERVER)   received -> the stream's end; event "first_byte" when the
    │                       edge wrote the first byte; a follower links to its leader
    ├ sluice.admission      received -> admitted (key checks, Coalescer, Pacer ticket)
    ├ sluice.queue          the pacer wait (queue_wait_ms), ending when the call went out
    └ chat {model} (CLIENT) the upstream call, leaders only: from the first attempt sent
                            (first byte - provider TTFT) to the stream's end, with
                            gen_ai.* attributes (provider, model, usage, finish reasons)

Times the Pool measured (queue wait, provider TTFT) are durations, placed on the edge's
clock by subtracting them from the edge's first byte: no two hosts' clocks are compared.
The upstream span therefore starts a hub hop (well under a millisecond on one host) later
than the request left the Pool.

Coalesced followers: the leader's span context is kept per stream id (bounded) in this
edge process, and a follower's request span links to it. A follower served by another
edge process finds no leader there and gets no link: carrying the context across would
need it in the stream's meta (the Admitted message), which this module does not do yet.
Rejected requests (no stream) get no trace.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

log = logging.getLogger("sluice.edge.tracing")

MAX_LEADERS = 4096  # leaders' span contexts kept for their followers' links

_tracer: Any = None  # an opentelemetry Tracer once set up; None = tracing off
_provider: Any = None
_otel: Any = None  # the opentelemetry.trace module, imported only when on
_leaders: OrderedDict[str, Any] = OrderedDict()


def setup_from_env(env: dict | None = None) -> bool:
    """Turn tracing on when OTEL_EXPORTER_OTLP_ENDPOINT is set and the SDK is installed."""
    env = os.environ if env is None else env
    if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _tracer is not None:
        return _tracer is not None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed "
            "(pip install 'sluice[otel]'): no traces"
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "sluice")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    install(provider)
    log.info("tracing: OTLP export to %s", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return True


def install(tracer_provider: Any) -> None:
    """Trace with `tracer_provider` (an SDK TracerProvider), or stop tracing with None."""
    global _tracer, _provider, _otel
    if tracer_provider is None:
        _tracer = _provider = None
        _leaders.clear()
        return
    from opentelemetry import trace

    _otel, _provider = trace, tracer_provider
    _tracer = tracer_provider.get_tracer("sluice")


def shutdown() -> None:
    """Flush what is batched (on the edge's way out)."""
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:  # exporting is best effort; stopping must not fail for it
            log.warning("tracing shutdown: %s", exc)
        install(None)


def begin(sub: Any, admitted_at: float) -> RequestTrace | None:
    """The request span of a client stream, or None when tracing is off."""
    if _tracer is None:
        return None
    return RequestTrace(sub, admitted_at)


def _ns(t: float) -> int:
    return int(t * 1e9)


class RequestTrace:
    """One request's spans: the request span opens now, its children are placed at the end."""

    def __init__(self, sub: Any, admitted_at: float):
        self.sub, self.admitted_at = sub, admitted_at
        stream_id = sub.flight.stream_id if getattr(sub, "flight", None) else None
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": sub.provider,
            "gen_ai.request.model": sub.model,
            "sluice.request_id": sub.request_id,
            "sluice.role": sub.role,
        }
        if stream_id:
            attributes["sluice.stream_id"] = stream_id
        links = []
        if sub.role == "follower" and stream_id in _leaders:
            links.append(_otel.Link(_leaders[stream_id], {"sluice.link": "coalesced_leader"}))
        self.span = _tracer.start_span(
            "sluice.request",
            kind=_otel.SpanKind.SERVER,
            attributes=attributes,
            links=links,
            start_time=_ns(sub.received_at),
        )
        if sub.role == "leader" and stream_id:
            _leaders[stream_id] = self.span.get_span_context()
            while len(_leaders) > MAX_LEADERS:
                _leaders.popitem(last=False)

    def end(self, outcome: dict, admission: Any, now: float) -> None:
        """The stream has ended with `outcome`; `admission` (edge/admission.py) holds what
        was measured: first byte, TTFT, provider TTFT, queue wait, who answered, usage."""
        span, sub = self.span, self.sub
        parent = _otel.set_span_in_context(span)
        _tracer.start_span("sluice.admission", context=parent, start_time=_ns(sub.received_at)).end(
            end_time=_ns(self.admitted_at)
        )
        first_byte = admission.first_byte_at
        provider_ttft_ms = admission.provider_ttft_ms
        if first_byte is not None:
            span.add_event("first_byte", timestamp=_ns(first_byte))
        sent = (
            first_byte - provider_ttft_ms / 1000.0 if first_byte is not None and provider_ttft_ms is not None else None
        )
        if sent is not None and admission.queue_wait_ms is not None:
            queued = _tracer.start_span(
                "sluice.queue", context=parent, start_time=_ns(sent - admission.queue_wait_ms / 1000.0)
            )
            queued.end(end_time=_ns(sent))
        error_type = outcome.get("error_code") if outcome.get("outcome") != "done" else None
        if sent is not None:  # the leader's upstream call
            model = admission.served.get("model", sub.model)
            call = _tracer.start_span(
                f"chat {model}",
                context=parent,
                kind=_otel.SpanKind.CLIENT,
                start_time=_ns(sent),
                attributes=self._genai(admission, model),
            )
            call.add_event("first_byte", timestamp=_ns(first_byte))
            if error_type:
                call.set_attribute("error.type", error_type)
                call.set_status(_otel.Status(_otel.StatusCode.ERROR))
            call.end(end_time=_ns(now))
        span.set_attribute("sluice.outcome", outcome.get("outcome", "error"))
        if admission.ttft_ms is not None:
            span.set_attribute("gen_ai.server.time_to_first_token", admission.ttft_ms / 1000.0)
        if error_type:
            span.set_attribute("error.type", error_type)
            if outcome.get("outcome") == "error":  # a client that left is not a failure of ours
                span.set_status(_otel.Status(_otel.StatusCode.ERROR))
        span.end(end_time=_ns(now))

    def _genai(self, admission: Any, model: str) -> dict:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": admission.served.get("provider", self.sub.provider),
            "gen_ai.request.model": model,
        }
        usage = admission.ending.get("usage") or {}
        for field, name in (("prompt_tokens", "input"), ("completion_tokens", "output")):
            if isinstance(usage.get(field), int):
                attributes[f"gen_ai.usage.{name}_tokens"] = usage[field]
        if admission.ending.get("finish_reason"):
            attributes["gen_ai.response.finish_reasons"] = [admission.ending["finish_reason"]]
        if admission.served.get("fallback_from"):
            attributes["sluice.fallback_from"] = admission.served["fallback_from"]
        return attributes
