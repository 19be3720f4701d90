"""What OpenTelemetry tracing costs a request at the edge (edge/tracing.py), off and on.

    .venv/bin/python -m bench.tracing_overhead [--n 200000]

Off (the default: no OTEL_EXPORTER_OTLP_ENDPOINT, or no SDK) a request pays one
`tracing.begin()` call that tests a global and returns None, and one `is not None` test at
its end. On, it pays the request span and its children; the exporter here is the SDK's
in-memory one, so the figure is the SDK's own cost without the network. Results go to
docs/benchmarks.md ("Tracing").
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from edge import tracing


def _per_call_ns(fn, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    now = time.time()
    sub = SimpleNamespace(
        request_id="r1",
        role="leader",
        received_at=now - 0.3,
        provider="openai",
        model="gpt-x",
        flight=SimpleNamespace(stream_id="st-1"),
    )
    admission = SimpleNamespace(  # what edge/admission.py measured
        first_byte_at=now - 0.1,
        provider_ttft_ms=150.0,
        queue_wait_ms=5.0,
        ttft_ms=200.0,
        served={},
        ending={"usage": {"prompt_tokens": 7, "completion_tokens": 2}, "finish_reason": "stop"},
    )
    outcome = {"outcome": "done", "error_code": None}

    def one_request() -> None:
        traced = tracing.begin(sub, now - 0.25)
        if traced is not None:
            traced.end(outcome, admission, now)

    def no_tracing_at_all() -> None:
        pass

    tracing.install(None)
    baseline = _per_call_ns(no_tracing_at_all, args.n)
    off = _per_call_ns(one_request, args.n)
    print(
        f"tracing off: {off - baseline:.0f} ns per request over an empty loop body ({off:.0f} vs {baseline:.0f} ns, "
        f"{args.n} requests)"
    )
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        print("tracing on: the OpenTelemetry SDK is not installed (extra 'otel'); skipped")
        return
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    n_on = max(1, args.n // 20)

    def traced_request() -> None:
        one_request()
        memory.clear()

    on = _per_call_ns(traced_request, n_on)
    tracing.install(None)
    print(f"tracing on (in-memory exporter, 4 spans): {on / 1000:.1f} us per request ({n_on} requests)")


if __name__ == "__main__":
    main()
