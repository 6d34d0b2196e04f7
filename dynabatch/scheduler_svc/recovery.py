"""What keeps requests alive across failures, on the scheduler's side.

- restore(): after a restart, take back this scheduler's requests still in the queue (a stable
  scheduler id); their clients re-attach with Resume.
- run(): every reap_s, reclaim the work of workers whose heartbeat expired (one scheduler wins
  each dead worker) and tell the relaying scheduler through its token stream (worker_lost), so
  that deltas the dead worker published before dying are relayed first; watch the queue's epoch
  (Redis restarted empty: every request in flight is gone) and outages (fail requests rather
  than hang when the queue stays unreachable).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import grpc

from dynabatch.scheduler_svc.requests import Failure, RequestTable
from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkItem
from dynabatch.wire.backoff import Backoff
from dynabatch.wire.queue import Queue, QueueError

log = logging.getLogger("dynabatch.scheduler")
TRIM_EVERY_S = 5.0
TRIM_MARGIN_MS = 30_000


class Recovery:
    def __init__(self, queue: Queue, table: RequestTable, scheduler_id: str, *,
                 reap_s: float = 0.25, outage_fail_s: float = 10.0) -> None:
        self.queue, self.table, self.scheduler_id = queue, table, scheduler_id
        self.reap_s, self.outage_fail_s = reap_s, outage_fail_s
        self.backoff = Backoff(max_s=reap_s * 4)
        self.epoch: str | None = None
        self.reclaimed = 0
        self._unsent: list[WorkItem] = []      # reclaimed, not yet announced (queue went down)
        self._trimmed_at = 0.0

    async def restore(self) -> int:
        """Track again the requests this scheduler had in the queue; returns how many."""
        self.epoch = await self.queue.epoch()
        items = await self.queue.recover(self.scheduler_id)
        for item in items:
            self.table.add(item, output=list(item.resume_token_ids))
        if items:
            log.info("scheduler %s restored %d requests from the queue", self.scheduler_id,
                     len(items))
        return len(items)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.reap()
                self.backoff.ok("recovery")
            except QueueError as e:
                self._fail_if_down_too_long()
                await self.backoff.wait(e, "recovery")
                continue
            try:
                await asyncio.wait_for(stop.wait(), self.reap_s)
            except TimeoutError:
                pass

    async def reap(self) -> None:
        epoch = await self.queue.epoch()
        if self.epoch is not None and epoch != self.epoch:
            self._fail_all("the queue lost its state (Redis restarted); please retry")
        self.epoch = epoch
        self._unsent += await self.queue.reclaim_dead()
        if self._unsent:
            await self._notify_lost()
        await self._trim()

    async def _trim(self) -> None:
        """Every TRIM_EVERY_S, drop deltas older than the oldest request in flight (less a margin
        for clock skew): a restart replays the token stream, and only live requests need it."""
        now = time.time()
        if now - self._trimmed_at < TRIM_EVERY_S:
            return
        self._trimmed_at = now
        oldest_ns = min((t.item.arrival_unix_ns for t in self.table.by_id.values()),
                        default=time.time_ns())
        await self.queue.trim_deltas(self.scheduler_id, oldest_ns // 1_000_000 - TRIM_MARGIN_MS)

    async def _notify_lost(self) -> None:
        batches: dict[str, TokenDeltaBatch] = defaultdict(TokenDeltaBatch)
        for item in self._unsent:
            batches[item.scheduler_id].deltas.add(request_id=item.request_id, attempt=item.attempt,
                                                  worker_lost=True)
        await self.queue.publish(dict(batches))
        log.warning("reclaimed %d requests from dead workers", len(self._unsent))
        self.reclaimed += len(self._unsent)
        self._unsent = []

    def _fail_if_down_too_long(self) -> None:
        down = self.backoff.down_for()
        if down > self.outage_fail_s and self.table.by_id:
            self._fail_all(f"the queue has been unreachable for {down:.0f} s; please retry")

    def _fail_all(self, why: str) -> None:
        ids = list(self.table.by_id)
        for rid in ids:
            self.table.end(rid, "failed", Failure(grpc.StatusCode.UNAVAILABLE, why))
        if ids:
            log.error("failed %d requests in flight: %s", len(ids), why)
