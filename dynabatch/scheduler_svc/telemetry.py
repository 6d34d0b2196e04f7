"""The scheduler's tracing and metrics hooks: a server span per Generate / Resume RPC, request
metrics when a request ends, and the batching loop's gauges.

Span `generate {model}` (SERVER) joins the client's trace from the gRPC metadata and carries the
GenAI semantic-convention attributes, events queued / admitted / first_token / finished, and
dynabatch.* attributes. Its context goes into WorkItem.trace_context (the worker's span hangs
under it, or under the Redis write when the queue is Redis); each worker attempt sends its own
span context back on its first token delta and is linked from here. A stream the client resumes
(after a broken connection or a scheduler restart) is a `resume {model}` span in the same trace.

Spans are never made current across a `yield` of the streaming handler: the span object is held
by the RPC and made current only around the queue write.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
from opentelemetry.semconv._incubating.attributes.rpc_attributes import (RPC_METHOD,
                                                                         RPC_RESPONSE_STATUS_CODE,
                                                                         RPC_SYSTEM_NAME)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode

from dynabatch.scheduler_svc.metrics import SchedulerMetrics
from dynabatch.scheduler_svc.policy import Decision, Policy, PolicyConfig, Waiting, WorkerView
from dynabatch.scheduler_svc.requests import Tracked
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1.worker_pb2 import TokenDelta, WorkItem
from dynabatch.wire import telemetry

OPERATION = GA.GenAiOperationNameValues.TEXT_COMPLETION.value
PROVIDER = "dynabatch"
METHOD = "dynabatch.v1.Scheduler/Generate"
METHOD_RESUME = "dynabatch.v1.Scheduler/Resume"
METHOD_MANY = "dynabatch.v1.Scheduler/GenerateMany"
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_ERROR: "error"}
PRIORITY = {pb.PRIORITY_LOW: "low", pb.PRIORITY_NORMAL: "normal", pb.PRIORITY_HIGH: "high"}
REFRESH_S = 0.5     # how often the batching loop's gauges are re-sampled
_UNTRACED = contextlib.nullcontext()


class RpcTelemetry:
    """One Generate or Resume call: its span (None when tracing is off) and its request. A
    context manager around the whole call (a class, not a generator-based one: one per RPC)."""

    def __init__(self, span: trace.Span | None, metrics: SchedulerMetrics, resume: bool,
                 active: dict[str, RpcTelemetry], owner: SchedulerTelemetry,
                 context: grpc.aio.ServicerContext) -> None:
        self.span, self.metrics, self.resume, self.active = span, metrics, resume, active
        self.owner, self.context = owner, context
        # an unsampled trace still passes its context on (so the worker does not start one of
        # its own), but gets no events, links or attributes
        self.recording = span is not None and span.is_recording()
        self.item: WorkItem | None = None
        self.reject_reason = ""
        self.admitted = False
        self.first_token = False
        self.linked_attempt = -1        # the worker attempt whose span is linked last
        self.final: pb.GenerateResponse | None = None

    def __enter__(self) -> RpcTelemetry:
        return self

    def __exit__(self, typ, error: BaseException | None, tb) -> None:
        self.owner._close(self, self.context, error)     # the exception, if any, goes on

    def validated(self, item: WorkItem) -> None:
        """The request is known: a valid new one (Generate) or the one to follow (Resume)."""
        self.item = item
        if self.resume and self.recording:
            self.active[item.request_id] = self
        if self.recording:
            if self.resume:
                self.span.update_name(f"resume {item.model}")
                self.span.set_attribute(GA.GEN_AI_REQUEST_MODEL, item.model)
            self.span.set_attributes({
                GA.GEN_AI_RESPONSE_ID: item.request_id,
                GA.GEN_AI_USAGE_INPUT_TOKENS: len(item.prompt_token_ids),
                "dynabatch.priority": PRIORITY.get(item.priority, "normal")})

    def rejected(self, reason: str) -> None:
        self.reject_reason = reason

    def sent(self, msg: pb.GenerateResponse) -> None:
        if msg.finish_reason:
            self.final = msg

    def queued(self, item: WorkItem) -> contextlib.AbstractContextManager:
        """The request is admitted; around the queue write (`with rpc.queued(item): ...`) the span
        is current and its context rides in the item."""
        self.admitted = True
        if self.recording:
            self.active[item.request_id] = self
        self.metrics.admissions.inc()
        self.metrics.input_tokens.inc(len(item.prompt_token_ids))
        if self.span is None:
            return _UNTRACED
        telemetry.inject(item.trace_context, self.span)
        self.span.add_event("queued")
        return trace.use_span(self.span, end_on_exit=False, record_exception=False,
                              set_status_on_exception=False)


class SchedulerTelemetry:
    def __init__(self, policy: Policy, config: PolicyConfig, tracer: trace.Tracer | None,
                 metrics: SchedulerMetrics) -> None:
        self.policy, self.tracer, self.metrics = policy, tracer, metrics
        self.ttft_target_s, self.tpot_target_s = config.ttft_target_s, config.tpot_target_s
        self.num_bins = config.num_bins
        self.active: dict[str, RpcTelemetry] = {}     # request id -> its RPC, while it runs
        self._refreshed = 0.0

    @classmethod
    def untraced(cls, policy: Policy) -> SchedulerTelemetry:
        """Metrics in a registry nobody serves, no spans (parts built alone, as in tests)."""
        return cls(policy, getattr(policy, "config", PolicyConfig()), None, SchedulerMetrics())

    # -- the RPCs ------------------------------------------------------------------------------
    def rpc(self, request: pb.GenerateRequest | pb.ResumeRequest, context: grpc.aio.ServicerContext,
            default_model: str, method: str = METHOD) -> RpcTelemetry:
        """Wraps a whole Generate or Resume call, or one request of a GenerateMany call (`with
        telemetry.rpc(...) as rpc:`); ends its span on the way out (and counts a request that
        was refused)."""
        return RpcTelemetry(self._start_span(request, context, default_model, method), self.metrics,
                            isinstance(request, pb.ResumeRequest), self.active, self, context)

    def _start_span(self, request, context: grpc.aio.ServicerContext,
                    default_model: str, method: str) -> trace.Span | None:
        if self.tracer is None:
            return None
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        attrs = {GA.GEN_AI_OPERATION_NAME: OPERATION, GA.GEN_AI_PROVIDER_NAME: PROVIDER,
                 RPC_SYSTEM_NAME: "grpc", "dynabatch.policy": self.policy.name}
        if isinstance(request, pb.ResumeRequest):
            name = "resume"
            attrs.update({RPC_METHOD: METHOD_RESUME, GA.GEN_AI_RESPONSE_ID: request.request_id,
                          "dynabatch.resume.offset": request.offset})
        else:       # a GenerateRequest, or bytes that did not decode as one (Malformed)
            model = getattr(request, "model", "") or default_model
            name = f"generate {model}"
            attrs.update({RPC_METHOD: method, GA.GEN_AI_REQUEST_MODEL: model})
            if isinstance(request, pb.GenerateRequest):
                attrs.update(_request_attributes(request))
        return self.tracer.start_span(name, context=telemetry.extract(carrier),
                                      kind=SpanKind.SERVER, attributes=attrs)

    def _close(self, rpc: RpcTelemetry, context: grpc.aio.ServicerContext,
               error: BaseException | None) -> None:
        item = rpc.item
        if item is not None and self.active.get(item.request_id) is rpc:
            del self.active[item.request_id]
        code, details = _outcome(rpc, context, error)
        if not rpc.admitted and not rpc.resume:
            self.metrics.rejections.labels(rpc.reject_reason or code.name.lower()).inc()
        if rpc.recording:
            self._end_span(rpc, code, details, error)

    def _end_span(self, rpc: RpcTelemetry, code: grpc.StatusCode, details: str,
                  error: BaseException | None) -> None:
        span = rpc.span
        assert span is not None
        span.set_attribute(RPC_RESPONSE_STATUS_CODE, code.name)
        if rpc.item is not None:
            span.set_attribute(GA.GEN_AI_RESPONSE_MODEL, rpc.item.model)
        final = rpc.final
        if final is not None:
            reason = FINISH.get(final.finish_reason, "unknown")
            span.set_attributes({GA.GEN_AI_RESPONSE_FINISH_REASONS: (reason,),
                                 GA.GEN_AI_USAGE_OUTPUT_TOKENS: final.timings.output_tokens,
                                 "dynabatch.ttft_ms": final.timings.ttft_ms,
                                 "dynabatch.tpot_ms": final.timings.tpot_ms})
            span.add_event("finished", {"finish_reason": reason})
        elif rpc.admitted:
            reason = "cancelled" if code == grpc.StatusCode.CANCELLED else "error"
            span.set_attribute(GA.GEN_AI_RESPONSE_FINISH_REASONS, (reason,))
            span.add_event("finished", {"finish_reason": reason})
        if code != grpc.StatusCode.OK:
            span.set_attribute(ERROR_TYPE, rpc.reject_reason or code.name)
            span.set_status(Status(StatusCode.ERROR, details))
            if error is not None and not _expected(error):
                span.record_exception(error)
        span.end()

    # -- hooks from the request table, the batching loop and the relay ------------------------
    def ended(self, tracked: Tracked, outcome: str) -> None:
        """A request ended (completed, cancelled or failed): its latency and SLA metrics."""
        item, model, m = tracked.item, tracked.item.model, self.metrics
        m.child(m.finished, outcome).inc()
        error = "" if outcome == "completed" else (
            tracked.failure.code.name if tracked.failure else outcome.upper())
        m.child(m.duration, model, error).observe(time.monotonic() - tracked.arrival)
        if outcome == "completed" and tracked.final_timings is not None:
            m.completed(model, tracked.final_timings,
                        item.ttft_target_ms / 1000 or self.ttft_target_s,
                        item.tpot_target_ms / 1000 or self.tpot_target_s)

    def assigned(self, tracked: Tracked, worker_id: str, decision: Decision) -> None:
        rpc = self.active.get(tracked.item.request_id)
        if rpc is None or rpc.span is None:
            return
        item = tracked.item
        target = decision.bin_targets.get((worker_id, item.bin),
                                          decision.batch_targets.get(worker_id, 0))
        queue_ms = ((tracked.assigned_at or tracked.arrival) - tracked.arrival) * 1000
        attrs = {"dynabatch.worker.id": worker_id, "dynabatch.bin": item.bin,
                 "dynabatch.b_target": target, "dynabatch.queue_time_ms": queue_ms,
                 "dynabatch.predicted_output_tokens": item.predicted_output_tokens,
                 "dynabatch.attempt": item.attempt}
        rpc.span.set_attributes(attrs)
        rpc.span.add_event("admitted", attrs)

    def relayed(self, new: int) -> None:
        """`new` output tokens were relayed (counted in bulk when no span needs each delta)."""
        self.metrics.output_total += new

    def delta(self, tracked: Tracked, delta: TokenDelta, new: int) -> None:
        """A worker's delta was added to a live request's output (`new` tokens of it were new).
        Called for every delta: unsampled requests cost a dict miss, sampled ones look at the
        context only once per worker attempt."""
        self.metrics.output_total += new      # into the counter at the next tick
        if self.tracer is None:
            return
        rpc = self.active.get(delta.request_id)       # recording spans only
        if rpc is None:
            return
        span = rpc.span
        assert span is not None
        if delta.attempt != rpc.linked_attempt and delta.trace_context:
            rpc.linked_attempt = delta.attempt
            span.add_link(telemetry.span_context(delta.trace_context),
                          {"dynabatch.link": "worker attempt"})
        if new and not rpc.first_token:
            rpc.first_token = True
            span.add_event("first_token")

    def decided(self, decision: Decision) -> None:
        self.metrics.decided(decision)

    def tick(self, now: float, waiting: list[Waiting], workers: list[WorkerView],
             running: Callable[[], dict[str, int]]) -> None:
        """Counters catch up; the gauges are re-sampled at most every REFRESH_S."""
        self.metrics.tick()
        if now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        predict = getattr(self.policy, "predict", None)
        depth = dict.fromkeys(range(self.num_bins), 0)
        if predict is None:
            depth[0] = len(waiting)
        else:
            for w in waiting:
                depth[predict(w)[1]] += 1
        self.metrics.refresh(now, depth, workers, running())


def _request_attributes(request: pb.GenerateRequest) -> dict:
    s = request.sampling
    attrs = {GA.GEN_AI_REQUEST_MAX_TOKENS: request.max_tokens,
             GA.GEN_AI_REQUEST_TEMPERATURE: s.temperature, GA.GEN_AI_REQUEST_TOP_P: s.top_p or 1.0}
    if s.top_k:
        attrs[GA.GEN_AI_REQUEST_TOP_K] = s.top_k
    if s.HasField("seed"):
        attrs[GA.GEN_AI_REQUEST_SEED] = s.seed
    return attrs


def _outcome(rpc: RpcTelemetry, context: grpc.aio.ServicerContext,
             error: BaseException | None) -> tuple[grpc.StatusCode, str]:
    if error is None:
        if rpc.final is not None and rpc.final.finish_reason == pb.FINISH_REASON_CANCELLED:
            return grpc.StatusCode.CANCELLED, "cancelled on the worker"
        return grpc.StatusCode.OK, ""
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN, context.details() or ""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED, "client went away"
    return grpc.StatusCode.UNKNOWN, repr(error)


def _expected(error: BaseException) -> bool:
    """Status-carrying ends, not crashes: no stack trace on the span."""
    return isinstance(error, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit))
