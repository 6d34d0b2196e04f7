"""The gRPC servicer: validation, admission, and the client's token stream."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import grpc

from dynabatch.scheduler_svc.batching import BatchingLoop, to_waiting
from dynabatch.scheduler_svc.handlers import Malformed
from dynabatch.scheduler_svc.policy import Policy, Waiting
from dynabatch.scheduler_svc.requests import Failure, RequestTable, Tracked
from dynabatch.scheduler_svc.telemetry import RpcTelemetry, SchedulerTelemetry
from dynabatch.scheduler_svc.validation import InvalidRequest, Limits, ModelInfo, validate
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc
from dynabatch.v1.worker_pb2 import WorkerControl, WorkerFeedback
from dynabatch.wire.queue import Queue, QueueError

log = logging.getLogger("dynabatch.scheduler")
DRAINING = "scheduler is draining; retry (another replica, or this one after its restart)"
# Trailing metadata on a status that ends the request itself (not just this stream): the SDK
# does not try to Resume it.
ENDED = (("x-request-ended", "true"),)


async def _check(request, context) -> None:
    """A request that did not even decode (e.g. invalid UTF-8 in a string) is INVALID_ARGUMENT."""
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, *, queue: Queue, policy: Policy, table: RequestTable, batching: BatchingLoop,
                 models: dict[str, ModelInfo], default_model: str, limits: Limits,
                 scheduler_id: str, telemetry: SchedulerTelemetry | None = None) -> None:
        self.queue, self.policy, self.table, self.batching = queue, policy, table, batching
        self.telemetry = telemetry or batching.telemetry
        self.models, self.default_model, self.limits = models, default_model, limits
        self.scheduler_id = scheduler_id
        self.accepting = True
        self._cleanups: set[asyncio.Task] = set()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        with self.telemetry.rpc(request, context, self.default_model) as rpc:
            tracked = await self._admit(request, context, rpc)
            async for msg in self._stream(tracked, 0, request.skip_text, context):
                rpc.sent(msg)
                yield msg

    async def _refuse_early(self, request, context: grpc.aio.ServicerContext) -> None:
        """A streaming RPC's first checks: a malformed request, or a scheduler that is draining."""
        await _check(request, context)
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    async def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                     rpc: RpcTelemetry) -> Tracked:
        """Validation, admission control and the queue write: the request to stream, or the
        call ends here with the status that says why not. (A coroutine, not a generator layer
        that every message of the stream would pass through.)"""
        await self._refuse_early(request, context)
        try:
            item = validate(request, self.models, self.default_model, self.limits,
                            self.scheduler_id, time.time_ns())
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rpc.validated(item)
        if self.table.get(item.request_id) is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id: {item.request_id!r} is already in flight")
        candidate = self._for_admission(item)
        admission = self.policy.admit(candidate, self.batching.last_waiting,
                                      self.batching.workers, time.time())
        if admission.accepted:     # counts for the next admissions until the next snapshot
            self.batching.last_waiting.append(candidate)
        else:
            self.table.counts["rejected"] += 1
            rpc.rejected(admission.reason)
            ms = max(1, int(admission.retry_after_s * 1000))
            context.set_trailing_metadata((("retry-after-ms", str(ms)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"not admitted: {admission.reason}; retry after {ms} ms")
        tracked = self.table.add(item)
        if not request.request_id:      # a client-chosen id is known to the client already
            await context.send_initial_metadata((("x-request-id", item.request_id),))
        try:
            with rpc.queued(item):
                await self.queue.submit(item)
        except QueueError as e:
            self.table.end(item.request_id, "failed",
                           Failure(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {e}"))
            context.set_trailing_metadata(ENDED)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {e}")
        self.batching.wake.set()
        log.debug("queued %s (%d prompt tokens)", item.request_id, len(item.prompt_token_ids))
        return tracked

    def _for_admission(self, item) -> Waiting:
        """The request as admission control sees it: its TTFT target less the headroom kept for
        the prefill, the first step and the error of the wait estimate."""
        waiting = to_waiting(item)
        if waiting.ttft_target_s > 0:
            waiting = replace(waiting, ttft_target_s=waiting.ttft_target_s
                              * (1 - self.limits.admission_headroom))
        return waiting

    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext):
        with self.telemetry.rpc(request, context, self.default_model) as rpc:
            tracked = await self._find(request, context, rpc)
            async for msg in self._stream(tracked, request.offset, request.skip_text, context):
                rpc.sent(msg)
                yield msg

    async def _find(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext,
                    rpc: RpcTelemetry) -> Tracked:
        """The request a Resume follows (live or recently ended), or the call ends here."""
        await self._refuse_early(request, context)
        tracked = self.table.find(request.request_id)
        if tracked is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"request_id: {request.request_id!r} is unknown here or ended long ago")
        rpc.validated(tracked.item)
        await context.send_initial_metadata((("x-request-id", tracked.item.request_id),))
        return tracked

    async def _stream(self, tracked: Tracked, offset: int, skip_text: bool, context):
        """Follow a request's output from `offset`; a client leaving cancels it (not while
        draining: then the request is handed back to the next scheduler instance)."""
        model = self.models.get(tracked.item.model)
        tokenizer = None if skip_text or model is None else model.tokenizer
        tracked.streams += 1
        try:
            async for msg in tracked.follow(offset, tokenizer, self.limits.stream_flush_s):
                if isinstance(msg, Failure):
                    if msg is tracked.failure:
                        context.set_trailing_metadata(ENDED)
                    await context.abort(msg.code, msg.message)
                yield msg
        except asyncio.CancelledError:
            if self.accepting and tracked.streams == 1 and not tracked.finished:
                self._spawn(self.cancel(tracked.item.request_id, "client went away"))
            raise
        finally:
            tracked.streams -= 1

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        await _check(request, context)
        return pb.CancelResponse(cancelled=await self.cancel(request.request_id, "cancelled by client"))

    async def cancel(self, request_id: str, why: str) -> bool:
        """Stop a request wherever it is; its client stream ends with CANCELLED."""
        tracked = self.table.get(request_id)
        if tracked is None or tracked.finished:
            return False
        worker = tracked.worker_id
        self.table.end(request_id, "cancelled", Failure(grpc.StatusCode.CANCELLED, why))
        try:
            if not await self.queue.remove_waiting(request_id) and worker:
                await self.queue.send_control(worker, WorkerControl(cancel_request_ids=[request_id]))
            await self.queue.finish(request_id)
        except QueueError as e:
            log.warning("cancel %s: %s (the queue forgets it when its state is lost)", request_id, e)
        self.batching.slot_freed()
        log.info("cancelled %s (%s)", request_id, why)
        return True

    async def GetStats(self, request, context) -> pb.GetStatsResponse:
        await _check(request, context)
        running = self.batching.running_by_worker()
        resp = pb.GetStatsResponse(policy=self.policy.name, waiting=self.batching.waiting_count,
                                   running=sum(running.values()), models=sorted(self.models),
                                   **self.table.counts)
        for view in self.batching.workers:
            fb = self.batching.feedback.get(view.worker_id) or WorkerFeedback()
            resp.workers.add(worker_id=view.worker_id, model=self.batching.models.get(view.worker_id, ""),
                             running=running.get(view.worker_id, 0),
                             kv_blocks_used=view.kv_blocks_used, kv_blocks_total=view.kv_blocks_total,
                             batch_target=self.batching.targets.get(view.worker_id, 0),
                             decode_step_ms=view.decode_step_ms, heartbeat_age_s=view.heartbeat_age_s,
                             engine_running=fb.running, engine_waiting=fb.waiting,
                             preemptions=fb.preemptions)
        return resp
