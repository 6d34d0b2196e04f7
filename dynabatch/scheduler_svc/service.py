"""The gRPC servicer: validation, admission, and the client's token stream."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from dynabatch.scheduler_svc.batching import BatchingLoop, to_waiting
from dynabatch.scheduler_svc.policy import Policy
from dynabatch.scheduler_svc.requests import Failure, RequestTable
from dynabatch.scheduler_svc.validation import InvalidRequest, Limits, ModelInfo, validate
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc
from dynabatch.v1.worker_pb2 import WorkerControl
from dynabatch.wire.queue import Queue

log = logging.getLogger("dynabatch.scheduler")


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, *, queue: Queue, policy: Policy, table: RequestTable, batching: BatchingLoop,
                 models: dict[str, ModelInfo], default_model: str, limits: Limits,
                 scheduler_id: str) -> None:
        self.queue, self.policy, self.table, self.batching = queue, policy, table, batching
        self.models, self.default_model, self.limits = models, default_model, limits
        self.scheduler_id = scheduler_id
        self.accepting = True
        self._cleanups: set[asyncio.Task] = set()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is draining; retry another")
        try:
            item = validate(request, self.models, self.default_model, self.limits,
                            self.scheduler_id, time.time_ns())
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.table.get(item.request_id) is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id: {item.request_id!r} is already in flight")
        admission = self.policy.admit(to_waiting(item), self.batching.last_waiting,
                                      self.batching.workers, time.time())
        if not admission.accepted:
            self.table.counts["rejected"] += 1
            ms = int(admission.retry_after_s * 1000)
            context.set_trailing_metadata((("retry-after-ms", str(ms)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"not admitted: {admission.reason}; retry after {ms} ms")
        tokenizer = None if request.skip_text else self.models[item.model].tokenizer
        tracked = self.table.add(item, tokenizer)
        await context.send_initial_metadata((("x-request-id", item.request_id),))
        await self.queue.submit(item)
        self.batching.wake.set()
        log.debug("queued %s (%d prompt tokens)", item.request_id, len(item.prompt_token_ids))
        try:
            while True:
                msg = await tracked.stream.get()
                if isinstance(msg, Failure):
                    await context.abort(msg.code, msg.message)
                yield msg
                if msg.finish_reason:
                    return
        except asyncio.CancelledError:
            task = asyncio.ensure_future(self.cancel(item.request_id, "client went away"))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            raise

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=await self.cancel(request.request_id, "cancelled by client"))

    async def cancel(self, request_id: str, why: str) -> bool:
        """Stop a request wherever it is; its client stream ends with CANCELLED."""
        tracked = self.table.get(request_id)
        if tracked is None or tracked.finished:
            return False
        worker = tracked.worker_id
        self.table.end(request_id, "cancelled", Failure(grpc.StatusCode.CANCELLED, why))
        if not await self.queue.remove_waiting(request_id) and worker:
            await self.queue.send_control(worker, WorkerControl(cancel_request_ids=[request_id]))
        await self.queue.finish(request_id)
        self.batching.wake.set()
        log.info("cancelled %s (%s)", request_id, why)
        return True

    async def GetStats(self, request, context) -> pb.GetStatsResponse:
        running = self.batching.running_by_worker()
        resp = pb.GetStatsResponse(policy=self.policy.name, waiting=self.batching.waiting_count,
                                   running=sum(running.values()), models=sorted(self.models),
                                   **self.table.counts)
        for view in self.batching.workers:
            resp.workers.add(worker_id=view.worker_id, model=self.batching.models.get(view.worker_id, ""),
                             running=running.get(view.worker_id, 0),
                             kv_blocks_used=view.kv_blocks_used, kv_blocks_total=view.kv_blocks_total,
                             batch_target=self.batching.targets.get(view.worker_id, 0),
                             decode_step_ms=view.decode_step_ms, heartbeat_age_s=view.heartbeat_age_s)
        return resp
