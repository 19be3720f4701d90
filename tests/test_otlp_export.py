"""With OTEL_EXPORTER_OTLP_ENDPOINT set, the real gateway exports its request traces over
OTLP/HTTP (edge/tracing.py `setup_from_env`): a collector of our own on loopback receives
the protobuf and finds the request span and its GenAI upstream span."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import chat_body, data_events, free_port, running_gateway, stream_chat, wait_until

pytestmark = pytest.mark.integration

trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the OTLP exporter (extra 'otel') is not installed",
)
pytest.importorskip(
    "opentelemetry.exporter.otlp.proto.http.trace_exporter", reason="the OTLP exporter is not installed"
)


class Collector(ThreadingHTTPServer):
    """The smallest OTLP/HTTP trace receiver: every span it is sent, by name."""

    daemon_threads = True

    def __init__(self, port: int):
        self.spans: list = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Receive)


class _Receive(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        request = trace_service.ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.server.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.server.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_request_is_exported_over_otlp_with_its_genai_upstream_span(sim):
    collector = Collector(free_port())
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    env = {"SIMULATED_BASE_URL": sim, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        with running_gateway(env) as gw:
            status, _, raw = stream_chat(gw.url + "/api/chat", chat_body("trace me over OTLP"))
            events = data_events(raw)
            assert status == 200 and events[-1]["type"] == "done", events[-1:]

            def names():
                with collector.lock:
                    return {span.name for span in collector.spans}

            wait_until(lambda: {"sluice.request", "sluice.admission"} <= names(), timeout=20, message="spans exported")
            with collector.lock:
                upstream = [s for s in collector.spans if s.name.startswith("chat ")]
            assert upstream, names()
            attributes = {a.key: a.value for a in upstream[0].attributes}
            assert attributes["gen_ai.provider.name"].string_value == "simulated"
            assert attributes["gen_ai.operation.name"].string_value == "chat"
    finally:
        collector.shutdown()
        collector.server_close()
