"""Tracing and metrics plumbing shared by the scheduler and the workers.

Tracing is off unless an OTLP endpoint is configured (`--otlp-endpoint`, or the standard
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or a caller passes its own
TracerProvider (tests, embedding). Off means no SDK provider: the services keep `tracer = None`
and skip every tracing hook. Everything else (sampler, service name, headers, resource) comes
from the standard OTEL_* variables, read by the OpenTelemetry SDK itself.

W3C trace context crosses each hop as a str -> str carrier: gRPC metadata (client -> scheduler),
WorkItem.trace_context (scheduler -> Redis -> worker), TokenDelta.trace_context (back).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from wsgiref.simple_server import WSGIServer

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("dynabatch.telemetry")

INSTRUMENTATION = "dynabatch"
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def setup_tracing(service_name: str, endpoint: str | None = None) -> TracerProvider | None:
    """Install a global SDK TracerProvider that exports spans over OTLP/gRPC.

    Does nothing (returns None) when no endpoint is configured, when OTEL_SDK_DISABLED=true, or
    when a provider is already installed (that one is returned). OTEL_SERVICE_NAME, when set,
    wins over `service_name`; the sampler follows OTEL_TRACES_SAMPLER(_ARG).
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if not endpoint and not any(os.environ.get(v) for v in ENDPOINT_VARS):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attrs))
    # An explicit endpoint wins; otherwise the exporter reads the OTEL_* variables itself.
    exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: OTLP/gRPC export to %s as %s", endpoint or "the OTEL_* endpoint",
             provider.resource.attributes.get(SERVICE_NAME))
    return provider


def get_tracer(name: str, provider: trace.TracerProvider | None = None) -> trace.Tracer | None:
    """A tracer from `provider`, else from an installed SDK provider; None when tracing is off."""
    if provider is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            return None
    return provider.get_tracer(f"{INSTRUMENTATION}.{name}")


def inject(carrier: MutableMapping[str, str], span: trace.Span) -> None:
    """Write the W3C context of `span` (traceparent, tracestate) into a str -> str carrier."""
    propagate.inject(carrier, context=trace.set_span_in_context(span))


def extract(carrier: Mapping[str, str]) -> Context:
    """The context a carrier holds (an empty context when it holds none)."""
    return propagate.extract(carrier)


def span_context(carrier: Mapping[str, str]) -> trace.SpanContext:
    """The remote span a carrier points at (invalid when it holds none)."""
    return trace.get_current_span(extract(carrier)).get_span_context()


class MeasuredGauge:
    """A gauge exported only once it holds a measurement: a fresh prometheus Gauge reads 0, which
    for SLA attainment or tokens/s would be a claim (0 % met, nothing served) made before any
    request was measured."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = value

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=self.value)


class MetricsServer:
    """Prometheus /metrics over HTTP for one CollectorRegistry (one per service instance)."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> None:
        self.registry, self.addr, self.requested_port = registry, addr, port
        self._server: WSGIServer | None = None
        self.port = 0

    def start(self) -> int:
        """Serve in a daemon thread; returns the bound port (`port` 0 picks a free one).

        A port already taken (e.g. a second worker on one host with the default port) is logged
        and leaves this instance without /metrics: metrics never stop the service (returns 0)."""
        try:
            self._server, _thread = start_http_server(self.requested_port, self.addr, self.registry)
        except OSError as e:
            log.error("metrics: cannot listen on %s:%d (%s); serving without /metrics "
                      "(set --metrics-port)", self.addr, self.requested_port, e)
            return 0
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", self.addr, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def metrics_port(flag: int | None, default: int | None) -> int | None:
    """--metrics-port, else DYNABATCH_METRICS_PORT, else the command's default (None: off)."""
    if flag is not None:
        return flag
    env = os.environ.get("DYNABATCH_METRICS_PORT")
    return int(env) if env else default
