"""The token relay: worker deltas in, client stream messages out."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from dynabatch.scheduler_svc.batching import BatchingLoop
from dynabatch.scheduler_svc.policy import Policy
from dynabatch.scheduler_svc.requests import Failure, RequestTable
from dynabatch.v1.scheduler_pb2 import FinishReason
from dynabatch.v1.worker_pb2 import TokenDelta
from dynabatch.wire.queue import Queue

log = logging.getLogger("dynabatch.scheduler")


class Relay:
    def __init__(self, queue: Queue, scheduler_id: str, table: RequestTable, policy: Policy,
                 batching: BatchingLoop) -> None:
        self.queue, self.scheduler_id, self.table = queue, scheduler_id, table
        self.policy, self.batching = policy, batching

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                batches = await self.queue.read_deltas(self.scheduler_id, 0.05)
            except Exception:
                log.exception("reading token deltas failed")
                await asyncio.sleep(0.1)
                continue
            now = time.monotonic()
            for batch in batches:
                for delta in batch.deltas:
                    await self.handle(delta, now)

    async def handle(self, delta: TokenDelta, now: float) -> None:
        tracked = self.table.get(delta.request_id)
        if tracked is None:
            return   # cancelled or failed meanwhile; the worker has been told
        if delta.preempted:
            await self._requeue(tracked)
            return
        if delta.finish_reason == FinishReason.FINISH_REASON_ERROR:
            await self._end(delta.request_id, "failed",
                            Failure(grpc.StatusCode.INTERNAL, f"worker error: {delta.error}"))
            return
        try:
            msg = tracked.accept(delta, now)
        except ValueError as e:
            log.error("%s", e)
            await self._end(delta.request_id, "failed", Failure(grpc.StatusCode.INTERNAL, str(e)))
            return
        if msg is None:
            return
        tracked.stream.put_nowait(msg)
        if tracked.finished:
            cancelled = delta.finish_reason == FinishReason.FINISH_REASON_CANCELLED
            self.policy.on_finish(delta.request_id, len(tracked.item.prompt_token_ids),
                                  len(tracked.output), time.time())
            await self._end(delta.request_id, "cancelled" if cancelled else "completed")

    async def _requeue(self, tracked) -> None:
        """The worker gave the request back: it runs again later, after the tokens already sent."""
        item = tracked.item
        del item.resume_token_ids[:]
        item.resume_token_ids.extend(tracked.output)
        item.attempt += 1
        tracked.worker_id = None
        await self.queue.requeue(item)
        self.batching.wake.set()

    async def _end(self, request_id: str, outcome: str, failure: Failure | None = None) -> None:
        self.table.end(request_id, outcome, failure)
        await self.queue.finish(request_id)
        self.batching.wake.set()
