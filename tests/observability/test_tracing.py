"""Traces of real requests, as a real OTLP/gRPC receiver gets them: one trace per request from
the client SDK through the scheduler and Redis to the worker, GenAI attribute names, error status
of cancelled and rejected requests."""
from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
from opentelemetry.semconv._incubating.attributes.db_attributes import DB_SYSTEM_NAME
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import (AsyncDynabatchClient, Cancelled, DynabatchClient, InvalidArgument,
                              ResourceExhausted)
from dynabatch.scheduler_svc.policy import PolicyConfig
from dynabatch.wire.models import DEFAULT_MODEL
from dynabatch.worker_svc.tracing import STEP_SPAN_EVERY

pytestmark = pytest.mark.redis
Kind = trace_pb2.Span.SpanKind
ERROR = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
SERVER_SPAN = f"generate {DEFAULT_MODEL}"
GEN_AI_NAMES = {v for k, v in vars(GA).items() if k.startswith("GEN_AI_") and isinstance(v, str)}


def stack_config(provider, redis_url: str, **policy) -> StackConfig:
    return StackConfig(engine="fake", redis_url=redis_url, tracer_provider=provider,
                       engine_options={"max_running": 64}, policy_config=PolicyConfig(**policy))


async def wait_for(receiver, provider, pred, timeout: float = 10.0):
    """Flush the provider until `pred(receiver)` holds (spans end asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        provider.force_flush()
        result = pred(receiver)
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def in_trace(receiver, trace_id: bytes, name: str):
    return [r for r in receiver.named(name) if r.span.trace_id == trace_id]


async def test_one_trace_spans_client_scheduler_redis_worker(otlp, redis_url):
    receiver, provider = otlp
    n_tokens = 3 * STEP_SPAN_EVERY
    async with LocalStack(stack_config(provider, redis_url)) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30, tracer_provider=provider) as c:
            result = await c.generate(prompt_token_ids=[5, 6, 7, 8], max_tokens=n_tokens,
                                      ignore_eos=True, temperature=0.5, top_p=0.9)
    assert len(result.token_ids) == n_tokens

    def complete(rcv):
        servers = [s for s in rcv.named(SERVER_SPAN)
                   if s.attrs.get(GA.GEN_AI_RESPONSE_ID) == result.request_id]
        return servers and in_trace(rcv, servers[0].span.trace_id, "decode") and servers[0]
    server = await wait_for(receiver, provider, complete)
    assert server, [r.span.name for r in receiver.spans]
    tid = server.span.trace_id
    (client,) = in_trace(receiver, tid, "generate")
    (submit,) = in_trace(receiver, tid, "submit redis")
    (worker,) = in_trace(receiver, tid, f"worker {DEFAULT_MODEL}")
    (prefill,) = in_trace(receiver, tid, "prefill")
    (decode,) = in_trace(receiver, tid, "decode")

    # client -> scheduler -> Redis -> worker -> (prefill, decode): one trace, parents in order
    assert client.span.parent_span_id == b"" and client.span.kind == Kind.SPAN_KIND_CLIENT
    assert server.span.parent_span_id == client.span.span_id
    assert server.span.kind == Kind.SPAN_KIND_SERVER
    assert submit.span.parent_span_id == server.span.span_id
    assert submit.attrs[DB_SYSTEM_NAME] == "redis" and submit.span.kind == Kind.SPAN_KIND_CLIENT
    assert worker.span.parent_span_id == submit.span.span_id
    assert worker.span.kind == Kind.SPAN_KIND_CONSUMER
    assert prefill.span.parent_span_id == decode.span.parent_span_id == worker.span.span_id
    assert prefill.span.end_time_unix_nano <= decode.span.start_time_unix_nano
    assert {client.scope, server.scope, worker.scope} == {
        "dynabatch.client", "dynabatch.scheduler", "dynabatch.worker"}

    # the worker's context came back with its first delta: the server span links to it
    assert [(ln.trace_id, ln.span_id) for ln in server.span.links] == [(tid, worker.span.span_id)]
    events = [e.name for e in server.span.events]
    assert events == ["queued", "admitted", "first_token", "finished"]
    a = server.attrs
    assert a[GA.GEN_AI_OPERATION_NAME] == "text_completion"
    assert a[GA.GEN_AI_REQUEST_MODEL] == DEFAULT_MODEL
    assert a[GA.GEN_AI_REQUEST_MAX_TOKENS] == n_tokens
    assert a[GA.GEN_AI_REQUEST_TEMPERATURE] == pytest.approx(0.5)
    assert a[GA.GEN_AI_REQUEST_TOP_P] == pytest.approx(0.9)
    assert a[GA.GEN_AI_USAGE_INPUT_TOKENS] == 4
    assert a[GA.GEN_AI_USAGE_OUTPUT_TOKENS] == n_tokens
    assert a[GA.GEN_AI_RESPONSE_FINISH_REASONS] == ["length"]
    assert a["dynabatch.policy"] == "fcfs" and a["dynabatch.priority"] == "normal"
    assert a["dynabatch.queue_time_ms"] >= 0 and a["dynabatch.b_target"] > 0
    assert "dynabatch.bin" in a
    assert server.span.status.code != ERROR
    assert client.attrs[GA.GEN_AI_USAGE_OUTPUT_TOKENS] == n_tokens

    # sampled engine steps: root spans linking to the request's worker span. The worker's
    # publishes run beside the next step, outside any span: never traced (no stray roots)
    steps = [s for s in receiver.named("engine step")
             if any(ln.span_id == worker.span.span_id for ln in s.span.links)]
    assert 2 <= len(steps) <= n_tokens // STEP_SPAN_EVERY + 1
    assert all(s.span.parent_span_id == b"" for s in steps)
    assert not receiver.named("publish redis")


async def test_client_joins_the_callers_trace(otlp, redis_url):
    receiver, provider = otlp
    tracer = provider.get_tracer("test")
    def sync_call(target: str) -> None:
        with DynabatchClient(target, timeout=30, tracer_provider=provider) as c:
            c.generate(prompt_token_ids=[3, 4], max_tokens=2, ignore_eos=True)

    async with LocalStack(stack_config(provider, redis_url)) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30, tracer_provider=provider) as c:
            with tracer.start_as_current_span("caller") as caller:
                await c.generate(prompt_token_ids=[1, 2], max_tokens=2, ignore_eos=True)
                await asyncio.to_thread(sync_call, stack.target)   # carries the context
    tid = caller.get_span_context().trace_id.to_bytes(16, "big")
    workers = await wait_for(receiver, provider,
                             lambda r: len(in_trace(r, tid, f"worker {DEFAULT_MODEL}")) == 2)
    assert workers
    clients = in_trace(receiver, tid, "generate")          # the async and the blocking client
    assert len(clients) == 2
    assert {c.span.parent_span_id for c in clients} == {
        caller.get_span_context().span_id.to_bytes(8, "big")}


async def test_attribute_names_are_the_semantic_convention_constants(otlp, redis_url):
    receiver, provider = otlp
    async with LocalStack(stack_config(provider, redis_url)) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30, tracer_provider=provider) as c:
            await c.generate(prompt_token_ids=[3], max_tokens=2, top_k=5, seed=1)
    spans = await wait_for(receiver, provider, lambda r: r.named(SERVER_SPAN))
    used = {k for r in receiver.spans for k in r.attrs if k.startswith("gen_ai.")}
    assert used <= GEN_AI_NAMES, used - GEN_AI_NAMES          # no home-made gen_ai.* names
    required = {GA.GEN_AI_OPERATION_NAME, GA.GEN_AI_REQUEST_MODEL, GA.GEN_AI_REQUEST_MAX_TOKENS,
                GA.GEN_AI_REQUEST_TEMPERATURE, GA.GEN_AI_REQUEST_TOP_P, GA.GEN_AI_REQUEST_TOP_K,
                GA.GEN_AI_REQUEST_SEED, GA.GEN_AI_USAGE_INPUT_TOKENS,
                GA.GEN_AI_USAGE_OUTPUT_TOKENS, GA.GEN_AI_RESPONSE_FINISH_REASONS,
                GA.GEN_AI_RESPONSE_ID, GA.GEN_AI_RESPONSE_MODEL}
    assert required <= set(spans[0].attrs)


async def test_cancelled_and_rejected_requests_carry_error_status(otlp, redis_url):
    receiver, provider = otlp
    cfg = stack_config(provider, redis_url, max_queue_tokens=1500)
    async with LocalStack(cfg) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30, tracer_provider=provider) as c:
            running = asyncio.Event()

            async def consume():
                async for _ in c.stream(prompt_token_ids=[4, 5], max_tokens=1400, ignore_eos=True,
                                        request_id="to-cancel"):
                    running.set()                   # on the worker: its span exists
                    await asyncio.sleep(0.01)       # a slow reader keeps the request running
            task = asyncio.create_task(consume())
            await asyncio.wait_for(running.wait(), 10)
            assert await c.cancel("to-cancel")
            with pytest.raises(Cancelled):
                await task
            with pytest.raises(ResourceExhausted):        # over max_queue_tokens: queue_full
                await c.generate(prompt_token_ids=[1], max_tokens=1600, request_id="too-big")
            with pytest.raises(InvalidArgument):
                await c.generate(prompt_token_ids=[1], max_tokens=0, request_id="bad")

    def by_error(rcv):
        found = {s.attrs.get(ERROR_TYPE): s for s in rcv.named(SERVER_SPAN)}
        if not {"CANCELLED", "queue_full", "INVALID_ARGUMENT"} <= set(found):
            return None
        worker = in_trace(rcv, found["CANCELLED"].span.trace_id, f"worker {DEFAULT_MODEL}")
        return found if worker else None
    errors = await wait_for(receiver, provider, by_error)
    assert errors, [(r.span.name, r.attrs) for r in receiver.named(SERVER_SPAN)]
    servers = {"to-cancel": errors["CANCELLED"], "too-big": errors["queue_full"],
               "bad": errors["INVALID_ARGUMENT"]}
    for rid, s in servers.items():
        assert s.span.status.code == ERROR, rid
        if rid != "bad":           # the invalid request never got as far as an id
            assert s.attrs[GA.GEN_AI_RESPONSE_ID] == rid
    assert servers["to-cancel"].attrs[GA.GEN_AI_RESPONSE_FINISH_REASONS] == ["cancelled"]
    assert [e.name for e in servers["to-cancel"].span.events][-1] == "finished"
    clients = {s.span.trace_id: s for s in receiver.named("generate")}
    for s in servers.values():
        client = clients[s.span.trace_id]
        assert client.span.status.code == ERROR
    assert clients[servers["too-big"].span.trace_id].attrs[ERROR_TYPE] == "RESOURCE_EXHAUSTED"
    worker = in_trace(receiver, servers["to-cancel"].span.trace_id, f"worker {DEFAULT_MODEL}")
    assert worker and worker[0].span.status.code == ERROR


async def test_a_caller_that_does_not_sample_gets_no_spans_downstream(otlp, redis_url):
    """The sampling decision travels with the context: the services sample every trace they
    start, yet a request whose client chose not to sample leaves no span anywhere."""
    receiver, provider = otlp
    client_provider = TracerProvider(sampler=ALWAYS_OFF)
    async with LocalStack(stack_config(provider, redis_url)) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30,
                                        tracer_provider=client_provider) as c:
            result = await c.generate(prompt_token_ids=[1, 2], max_tokens=3, ignore_eos=True)
    assert len(result.token_ids) == 3
    provider.force_flush()
    names = {r.span.name for r in receiver.spans}
    assert not names & {SERVER_SPAN, "submit redis", f"worker {DEFAULT_MODEL}", "prefill"}, names
