"""Optional client-side tracing: a CLIENT span per Generate call, its W3C context sent in the gRPC
metadata (traceparent, tracestate) so the scheduler's span joins the caller's trace.

Active only when opentelemetry-api and opentelemetry-semantic-conventions are importable; the
client itself needs neither (grpcio + protobuf suffice). Spans are recorded by whatever
TracerProvider the application installed (or the one passed to the client); with none, the API's
no-op spans cost next to nothing.
"""
from __future__ import annotations

from typing import Any

from dynabatch.v1 import scheduler_pb2 as pb

try:
    from opentelemetry import propagate, trace
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
    from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:       # tracing is optional: the client works without OpenTelemetry
    trace = None  # type: ignore[assignment]

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_ERROR: "error"}
Metadata = tuple[tuple[str, str], ...]


class CallTrace:
    """The span of one Generate call (a no-op without OpenTelemetry)."""

    def __init__(self, span: Any = None) -> None:
        self.span = span
        self.final: pb.GenerateResponse | None = None

    def message(self, msg: pb.GenerateResponse) -> None:
        if self.span is not None and msg.finish_reason:
            self.final = msg

    def error(self, code_name: str, details: str) -> None:
        if self.span is not None:
            self.span.set_attribute(ERROR_TYPE, code_name)
            self.span.set_status(Status(StatusCode.ERROR, details))

    def end(self) -> None:
        if self.span is None:
            return
        final = self.final
        if final is not None:
            self.span.set_attributes({
                GA.GEN_AI_RESPONSE_ID: final.request_id,
                GA.GEN_AI_RESPONSE_FINISH_REASONS: (FINISH.get(final.finish_reason, "unknown"),),
                GA.GEN_AI_USAGE_INPUT_TOKENS: final.timings.prompt_tokens,
                GA.GEN_AI_USAGE_OUTPUT_TOKENS: final.timings.output_tokens})
        self.span.end()


def tracer(provider: Any = None) -> Any:
    """The client's tracer (None without OpenTelemetry)."""
    if trace is None:
        return None
    return trace.get_tracer("dynabatch.client", tracer_provider=provider)


def start(client_tracer: Any, request: pb.GenerateRequest,
          metadata: Metadata) -> tuple[CallTrace, Metadata]:
    """Open the call's span (a child of the caller's current span) and add its context to the
    call's metadata."""
    if client_tracer is None:
        return CallTrace(), metadata
    s = request.sampling
    attrs = {GA.GEN_AI_OPERATION_NAME: GA.GenAiOperationNameValues.TEXT_COMPLETION.value,
             GA.GEN_AI_REQUEST_MAX_TOKENS: request.max_tokens,
             GA.GEN_AI_REQUEST_TEMPERATURE: s.temperature, GA.GEN_AI_REQUEST_TOP_P: s.top_p or 1.0}
    if request.model:
        attrs[GA.GEN_AI_REQUEST_MODEL] = request.model
    span = client_tracer.start_span(f"generate {request.model}".rstrip(),
                                    kind=SpanKind.CLIENT, attributes=attrs)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return CallTrace(span), metadata + tuple(carrier.items())
