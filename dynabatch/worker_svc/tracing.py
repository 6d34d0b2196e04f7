"""A worker's spans: one per request attempt (children prefill, decode) and sampled engine steps.

The attempt span `worker {model}` (CONSUMER) continues the trace carried in
WorkItem.trace_context; its context goes back to the scheduler on the attempt's first delta.
Engine steps are shared by many requests, so a step span is a root span of its own with one span
link per request that got a token in that step. Only one step in `step_every` gets a span: the
per-request spans cost O(1) per request, step spans would otherwise cost O(batch) per step.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from dynabatch.v1.worker_pb2 import TokenDelta, WorkItem
from dynabatch.wire import telemetry
from dynabatch.worker_svc.engine.api import TokenOutput

# A step span with 256 links costs ~1.8 ms of CPU (recorded and OTLP-encoded); one step in 64
# averages ~36 us per step, 0.5 % of a fake-engine step (tools/trace_overhead.py, step_spans).
STEP_SPAN_EVERY = 64
FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


@dataclass
class _Attempt:
    span: trace.Span
    phase: trace.Span           # the open prefill or decode child
    resumed: int                # output tokens an earlier attempt produced


class WorkerTracing:
    def __init__(self, tracer: trace.Tracer, worker_id: str, model: str) -> None:
        self.tracer, self.worker_id, self.model = tracer, worker_id, model
        self.step_every = STEP_SPAN_EVERY       # read now: tools/trace_overhead.py varies it
        self.attempts: dict[str, _Attempt] = {}
        # Attempts that produced no token yet: still in prefill, and their context has not gone
        # back to the scheduler. Per publish only these (and the finished) cost any work.
        self.fresh: set[str] = set()
        self._steps = 0

    def pulled(self, item: WorkItem) -> None:
        """An assignment arrived: open its attempt span and the prefill phase."""
        self._end(item.request_id, None, error="reassigned")
        span = self.tracer.start_span(
            f"worker {self.model}", context=telemetry.extract(item.trace_context),
            kind=SpanKind.CONSUMER,
            attributes={GA.GEN_AI_REQUEST_MODEL: self.model, GA.GEN_AI_RESPONSE_ID: item.request_id,
                        GA.GEN_AI_USAGE_INPUT_TOKENS: len(item.prompt_token_ids),
                        "dynabatch.worker.id": self.worker_id, "dynabatch.attempt": item.attempt,
                        "dynabatch.resume_tokens": len(item.resume_token_ids)})
        if not span.is_recording():     # the trace was not sampled: nothing more to do
            return
        phase = self.tracer.start_span("prefill", context=trace.set_span_in_context(span))
        self.attempts[item.request_id] = _Attempt(span, phase, len(item.resume_token_ids))
        self.fresh.add(item.request_id)

    def announce(self, delta: TokenDelta) -> None:
        """A delta of a fresh attempt carries the attempt's context back to the scheduler."""
        telemetry.inject(delta.trace_context, self.attempts[delta.request_id].span)

    def published(self, pending: dict[str, TokenOutput], done: list[str],
                  errors: dict[str, str]) -> None:
        """Deltas reached the queue: fresh attempts with tokens move to decode, done ones end."""
        for rid in [r for r in self.fresh if r in pending]:
            if pending[rid].token_ids:
                self.fresh.discard(rid)
                a = self.attempts[rid]
                a.phase.end()
                a.phase = self.tracer.start_span("decode", context=trace.set_span_in_context(a.span))
        for rid in done:
            out = pending.get(rid)
            if rid in errors or out is None:
                self._end(rid, None, error=errors.get(rid, "lost"))
            else:
                self._end(rid, out.finish_reason, out.offset + len(out.token_ids))

    def _end(self, request_id: str, finish_reason: str | None, output_end: int = 0,
             error: str = "") -> None:
        """`output_end`: the request's output length when it finished normally."""
        a = self.attempts.pop(request_id, None)
        self.fresh.discard(request_id)
        if a is None:
            return
        a.phase.end()
        if finish_reason in ("stop", "length"):
            a.span.set_attribute(GA.GEN_AI_USAGE_OUTPUT_TOKENS, output_end - a.resumed)
        if finish_reason is not None:
            a.span.set_attribute(GA.GEN_AI_RESPONSE_FINISH_REASONS, (FINISH[finish_reason],))
        if finish_reason == "abort" or error:
            a.span.set_attribute(ERROR_TYPE, error or "cancelled")
            a.span.set_status(Status(StatusCode.ERROR, error or "cancelled"))
        a.span.end()

    def close(self, why: str) -> None:
        """The loop stopped: end what is still open."""
        for rid in list(self.attempts):
            self._end(rid, None, error=why)

    @contextlib.contextmanager
    def step(self, outputs: list[TokenOutput], start_ns: int, step_kind: str,
             compute_s: float | None = None) -> Iterator[None]:
        """Around taking in a step's outputs; every step_every-th step gets a span that started
        when the step did and links the requests it served. `compute_s`: the step's own time
        (measured by the engine process); default: until now."""
        self._steps += 1
        if self._steps % self.step_every:
            yield
            return
        links = [Link(a.span.get_span_context()) for o in outputs
                 if (a := self.attempts.get(o.request_id)) is not None]
        span = self.tracer.start_span(
            "engine step", start_time=start_ns, links=links,
            attributes={"dynabatch.worker.id": self.worker_id, "dynabatch.step.kind": step_kind,
                        "dynabatch.step.batch_size": len(outputs),
                        "dynabatch.step.compute_ms": (compute_s * 1e3 if compute_s is not None
                                                      else (time.time_ns() - start_ns) / 1e6),
                        "dynabatch.step.sample_every": self.step_every})
        with trace.use_span(span, end_on_exit=True):
            yield
