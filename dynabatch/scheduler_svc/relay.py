"""The token relay: worker deltas in, request outputs (which client streams follow) out."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from dynabatch.scheduler_svc.batching import BatchingLoop
from dynabatch.scheduler_svc.policy import Policy
from dynabatch.scheduler_svc.requests import Failure, RequestTable, Tracked
from dynabatch.scheduler_svc.telemetry import SchedulerTelemetry
from dynabatch.v1.scheduler_pb2 import FinishReason
from dynabatch.v1.worker_pb2 import TokenDelta, TokenDeltaBatch
from dynabatch.wire.backoff import Backoff
from dynabatch.wire.queue import Queue, QueueError

log = logging.getLogger("dynabatch.scheduler")
MAX_CRASHES = 2     # a request that was running on this many crashed workers is poison


class Relay:
    def __init__(self, queue: Queue, scheduler_id: str, table: RequestTable, policy: Policy,
                 batching: BatchingLoop, telemetry: SchedulerTelemetry | None = None) -> None:
        self.queue, self.scheduler_id, self.table = queue, scheduler_id, table
        self.telemetry = telemetry or batching.telemetry
        self.policy, self.batching = policy, batching
        self.backoff = Backoff()
        self._ended: list[str] = []      # ended since the last read: forgotten in one write

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                batches = await self.queue.read_deltas(self.scheduler_id, 0.05)
                self.backoff.ok("relay")
            except QueueError as e:
                await self.backoff.wait(e, "relay")
                continue
            now = time.monotonic()
            for batch in batches:
                for delta in self._relay(batch, now):
                    try:
                        await self.handle(delta, now, batch.step_end_unix_ns)
                    except QueueError as e:   # the request stays; its client may time out
                        log.warning("relay: %s for %s", e, delta.request_id)
            await self._forget_ended()

    async def _forget_ended(self) -> None:
        """The queue forgets the requests that ended in this read, in one write: a step that
        ends hundreds of requests must not cost a round trip each before the next is relayed
        (their clients have their last message already)."""
        if not self._ended:
            return
        ids, self._ended = self._ended, []
        try:
            await self.queue.finish(*ids)
        except QueueError as e:       # tried again after the next read
            self._ended[:0] = ids
            log.warning("relay: could not forget %d ended requests yet: %s", len(ids), e)

    def _relay(self, batch: TokenDeltaBatch, now: float) -> list[TokenDelta]:
        """The common case in one pass, without a coroutine: tokens of live requests that do
        not end them. Returns the deltas `handle` must take (ends, losses, preemptions, gaps)."""
        rest = []
        live = self.table.by_id
        per_delta = self.telemetry.tracer is not None     # spans look at each delta
        added = 0
        for delta in batch.deltas:
            if delta.finish_reason or delta.worker_lost or delta.preempted:
                rest.append(delta)
                continue
            tracked = live.get(delta.request_id)
            if tracked is None or delta.attempt != tracked.item.attempt:
                continue              # ended meanwhile, or from a superseded run
            new = tracked.add(delta.offset, delta.token_ids, now, batch.step_end_unix_ns)
            if new < 0:
                rest.append(delta)    # a gap: handle() fails the request
            elif per_delta:
                self.telemetry.delta(tracked, delta, new)
            else:
                added += new
        self.telemetry.relayed(added)
        return rest

    async def handle(self, delta: TokenDelta, now: float, step_end_ns: int = 0) -> None:
        tracked = self.table.get(delta.request_id)
        if tracked is None or delta.attempt != tracked.item.attempt:
            return   # ended meanwhile (the worker has been told), or from a superseded run
        if delta.worker_lost:
            await self._lost(tracked, delta.worker_id)
        elif delta.preempted:
            await self._requeue(tracked)
        elif delta.finish_reason == FinishReason.FINISH_REASON_ERROR:
            await self._end(delta.request_id, "failed",
                            Failure(grpc.StatusCode.INTERNAL, f"worker error: {delta.error}"))
        else:
            before = len(tracked.output)
            try:
                tracked.accept(delta, now, step_end_ns)
            except ValueError as e:      # tokens went missing on the way (a queue outage)
                log.error("%s", e)
                await self._end(delta.request_id, "failed",
                                Failure(grpc.StatusCode.UNAVAILABLE, f"token stream broken: {e}"))
                return
            self.telemetry.delta(tracked, delta, len(tracked.output) - before)
            if tracked.finished:
                await self._finished(tracked, delta)

    async def _finished(self, tracked: Tracked, delta: TokenDelta) -> None:
        cancelled = delta.finish_reason == FinishReason.FINISH_REASON_CANCELLED
        self.policy.on_finish(delta.request_id, len(tracked.item.prompt_token_ids),
                              len(tracked.output), time.time())
        await self._end(delta.request_id, "cancelled" if cancelled else "completed")

    async def _lost(self, tracked: Tracked, worker_id: str) -> None:
        """Its worker died: run it again elsewhere, unless it has now killed MAX_CRASHES workers."""
        tracked.item.crashes += 1
        rid = tracked.item.request_id
        if tracked.item.crashes >= MAX_CRASHES:
            log.error("%s: poison request (its worker crashed %d times); failing it", rid,
                      tracked.item.crashes)
            await self._end(rid, "failed", Failure(
                grpc.StatusCode.INTERNAL,
                f"poison request: {tracked.item.crashes} workers crashed while running it"))
            return
        log.warning("%s: worker %s died; re-queued after %d delivered tokens", rid, worker_id,
                    len(tracked.output))
        await self._requeue(tracked)

    async def _requeue(self, tracked: Tracked) -> None:
        """Run it again later, after the tokens already sent (preempted, or its worker died)."""
        item = tracked.item
        del item.resume_token_ids[:]
        item.resume_token_ids.extend(tracked.output)
        item.attempt += 1
        if item.queue_deadline_unix_ns:     # a fresh queue TTL: the wait starts again
            item.queue_deadline_unix_ns = time.time_ns() + (item.queue_deadline_unix_ns
                                                            - item.arrival_unix_ns)
        tracked.worker_id = None
        await self.queue.requeue(item)
        self.batching.wake.set()

    async def _end(self, request_id: str, outcome: str, failure: Failure | None = None) -> None:
        self.table.end(request_id, outcome, failure)
        self._ended.append(request_id)
        self.batching.slot_freed()
