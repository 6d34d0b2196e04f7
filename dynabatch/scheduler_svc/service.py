"""The gRPC servicer: validation, admission, and the client's token stream."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import grpc

from dynabatch.scheduler_svc.batching import BatchingLoop, to_waiting
from dynabatch.scheduler_svc.handlers import Malformed
from dynabatch.scheduler_svc.many import ManyCall
from dynabatch.scheduler_svc.policy import Policy, Waiting
from dynabatch.scheduler_svc.requests import Failure, RequestTable, Tracked
from dynabatch.scheduler_svc.telemetry import METHOD, RpcTelemetry, SchedulerTelemetry
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


class _Header:
    """The x-request-id initial metadata of one call, sent without suspending its handler.

    Its gRPC batch is started at once (when the request is admitted, as before) and its
    completion is collected before the stream's first message or status, which is when grpc.aio
    needs it: awaiting it in place cost the handler's task a wake per request for nothing.
    (Starting the batches of the calls admitted in one turn of the event loop together was
    tried: admissions come one per turn, so there was nothing to group.)

    grpc.aio's send_initial_metadata is a coroutine whose only suspension is the future of its
    batch: it is run here to that point by hand, and resumed once the future is done."""

    __slots__ = ("_coro", "_future")

    def __init__(self, context: grpc.aio.ServicerContext, request_id: str) -> None:
        self._coro = context.send_initial_metadata((("x-request-id", request_id),))
        try:
            self._future = self._coro.send(None)     # raises where the send would have
        except StopIteration:
            self._coro = None
        except BaseException:
            self._coro = None
            raise

    async def sent(self) -> None:
        """The metadata has gone (or the send's error is raised here)."""
        coro, self._coro = self._coro, None
        if coro is None:
            return
        try:
            while True:
                future = self._future
                if not future.done():
                    try:
                        await asyncio.wait((future,))     # done, without taking its result
                    except BaseException:
                        coro.close()
                        raise
                self._future = coro.send(None)       # StopIteration: the send returned
        except StopIteration:
            return

    def close(self) -> None:
        """The stream ends before its first message (its task was cancelled): let go."""
        coro, self._coro = self._coro, None
        if coro is not None:
            coro.close()
            self._future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    """A batch nobody waits for any more: its error is not logged as never retrieved."""
    if not future.cancelled():
        future.exception()


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

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # A coroutine writing its messages (grpc.aio's reader/writer API), not an async
        # generator that grpc iterates: no generator layers between a message and its write.
        await self.generate(request, context)

    async def GenerateMany(self, requests, context: grpc.aio.ServicerContext) -> None:
        await self._refuse_if_draining(context)
        await ManyCall(self, context).run(requests)

    async def generate(self, request: pb.GenerateRequest, context, method: str = METHOD) -> None:
        """One request from admission to its last message, written to `context` (a Generate
        call's, or a GenerateMany request's stand-in)."""
        with self.telemetry.rpc(request, context, self.default_model, method) as rpc:
            tracked, header = await self._admit(request, context, rpc)
            await self._stream(tracked, 0, request.skip_text, context, rpc, header)

    async def _refuse_early(self, request, context: grpc.aio.ServicerContext) -> None:
        """A streaming RPC's first checks: a malformed request, or a scheduler that is draining."""
        await _check(request, context)
        await self._refuse_if_draining(context)

    async def _refuse_if_draining(self, context) -> None:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    async def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                     rpc: RpcTelemetry) -> tuple[Tracked, _Header | None]:
        """Validation, admission control and the queue write: the request to stream (and the
        x-request-id header on its way, when the scheduler chose the id), or the call ends here
        with the status that says why not. (A coroutine, not a generator layer that every
        message of the stream would pass through.)"""
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
        # a client-chosen id is known to the client already
        header = None if request.request_id else _Header(context, item.request_id)
        tracked = self.table.add(item)
        try:
            with rpc.queued(item):
                await self.queue.submit(item)
        except QueueError as e:
            self.table.end(item.request_id, "failed",
                           Failure(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {e}"))
            context.set_trailing_metadata(ENDED)
            if header is not None:
                await header.sent()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"queue unavailable: {e}")
        except BaseException:
            if header is not None:
                header.close()
            raise
        self.batching.wake.set()
        log.debug("queued %s (%d prompt tokens)", item.request_id, len(item.prompt_token_ids))
        return tracked, header

    def _for_admission(self, item) -> Waiting:
        """The request as admission control sees it: its TTFT target less the headroom kept for
        the prefill, the first step and the error of the wait estimate."""
        waiting = to_waiting(item)
        if waiting.ttft_target_s > 0:
            waiting = replace(waiting, ttft_target_s=waiting.ttft_target_s
                              * (1 - self.limits.admission_headroom))
        return waiting

    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> None:
        with self.telemetry.rpc(request, context, self.default_model) as rpc:
            tracked = await self._find(request, context, rpc)
            await self._stream(tracked, request.offset, request.skip_text, context, rpc)

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

    async def _stream(self, tracked: Tracked, offset: int, skip_text: bool,
                      context: grpc.aio.ServicerContext, rpc: RpcTelemetry,
                      header: _Header | None = None) -> None:
        """Write a request's output from `offset` to the client; a client leaving cancels it
        (not while draining: then the request is handed back to the next scheduler instance).
        `header`: initial metadata still on its way, collected before the first message."""
        model = self.models.get(tracked.item.model)
        tokenizer = None if skip_text or model is None else model.tokenizer
        tracked.streams += 1
        follow = tracked.follow(offset, tokenizer, self.limits.stream_flush_s)
        try:
            async for msg in follow:
                if header is not None:
                    await header.sent()
                    header = None
                if isinstance(msg, Failure):
                    if msg is tracked.failure:
                        context.set_trailing_metadata(ENDED)
                    await context.abort(msg.code, msg.message)
                rpc.sent(msg)
                await context.write(msg)
            if header is not None:
                await header.sent()
                header = None
        except BaseException as e:
            # the task cancelled, or a write that failed: the client is gone (an abort is ours)
            if (not isinstance(e, grpc.aio.AbortError) and self.accepting
                    and tracked.streams == 1 and not tracked.finished):
                self._spawn(self.cancel(tracked.item.request_id, "client went away"))
            raise
        finally:
            tracked.streams -= 1
            if header is not None:
                header.close()
            if follow.ag_frame is not None:    # left at a message (an abort): its listener goes
                await follow.aclose()

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
                             preemptions=fb.preemptions,
                             step_prefill_tokens=fb.step_prefill_tokens)
        return resp
