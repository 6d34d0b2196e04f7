"""A real OTLP/gRPC trace receiver (opentelemetry-proto's TraceService) and a TracerProvider that
exports to it, plus a /metrics scraper using prometheus_client's text parser."""
from __future__ import annotations

import threading
import urllib.request
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Received:
    service: str
    scope: str
    span: trace_pb2.Span

    @property
    def attrs(self) -> dict:
        return {kv.key: _value(kv.value) for kv in self.span.attributes}


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every span exported to it, as the OTLP protobuf messages arrived."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((kv.value.string_value for kv in rs.resource.attributes
                                if kv.key == SERVICE_NAME), "")
                for ss in rs.scope_spans:
                    self.spans.extend(Received(service, ss.scope.name, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[Received]:
        with self.lock:
            return [r for r in self.spans if r.span.name == name]


@pytest.fixture
def otlp():
    """(receiver, provider): spans recorded by `provider` arrive at `receiver` over OTLP/gRPC."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "dynabatch-test"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True), schedule_delay_millis=100))
    yield receiver, provider
    provider.shutdown()
    server.stop(0)


@pytest.fixture
def scrape():
    """scrape(port) -> /metrics as {sample name{labels}: value} (prometheus_client's parser)."""
    return _scrape


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
