"""Client spans for the Redis queue calls made on behalf of a traced request.

A thin wrapper rather than opentelemetry-instrumentation-redis: that instruments every command
process-wide, and the scheduler's 5 ms batching tick and the workers' polling would each start a
trace of their own, burying the requests' traces. Here a call gets a span only when it runs inside
a recording span (a request being submitted).

`submit` also rewrites WorkItem.trace_context to its own span, so the worker's span is a child of
the Redis write that carried the request: client -> scheduler -> Redis -> worker.
"""
from __future__ import annotations

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes.db_attributes import (DB_NAMESPACE,
                                                                        DB_OPERATION_BATCH_SIZE,
                                                                        DB_OPERATION_NAME,
                                                                        DB_SYSTEM_NAME)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import SpanKind

from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkItem
from dynabatch.wire import telemetry
from dynabatch.wire.queue import Queue


class TracedQueue:
    """Delegates every Queue method to `inner`; submit, publish and ack also record a span."""

    def __init__(self, inner: Queue, tracer: trace.Tracer) -> None:
        self.inner, self.tracer = inner, tracer
        kwargs = inner.redis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
        self.attrs = {DB_SYSTEM_NAME: "redis", DB_NAMESPACE: str(kwargs.get("db", 0)),
                      SERVER_ADDRESS: str(kwargs.get("host", "")),
                      SERVER_PORT: int(kwargs.get("port", 6379))}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _span(self, operation: str, batch: int = 1):
        attrs = {**self.attrs, DB_OPERATION_NAME: operation}
        if batch > 1:
            attrs[DB_OPERATION_BATCH_SIZE] = batch
        return self.tracer.start_as_current_span(f"{operation} redis", kind=SpanKind.CLIENT,
                                                 attributes=attrs)

    async def submit(self, item: WorkItem) -> None:
        if not trace.get_current_span().is_recording():
            return await self.inner.submit(item)
        with self._span("submit") as span:
            telemetry.inject(item.trace_context, span)
            await self.inner.submit(item)

    async def publish(self, batches: dict[str, TokenDeltaBatch]) -> None:
        if not trace.get_current_span().is_recording():
            return await self.inner.publish(batches)
        with self._span("publish", len(batches)):
            await self.inner.publish(batches)

    async def ack(self, worker_id: str, request_ids: list[str]) -> None:
        if not trace.get_current_span().is_recording():
            return await self.inner.ack(worker_id, request_ids)
        with self._span("ack", len(request_ids)):
            await self.inner.ack(worker_id, request_ids)


def traced(queue: Queue, tracer: trace.Tracer | None) -> Queue:
    """`queue` with Redis client spans when tracing is on and it is the Redis backend."""
    if tracer is None or not hasattr(queue, "redis") or isinstance(queue, TracedQueue):
        return queue
    return TracedQueue(queue, tracer)  # type: ignore[return-value]
