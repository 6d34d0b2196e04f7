"""The queue between schedulers and workers: one interface, two backends (Redis, in-process).

Life of a request in the queue:
  scheduler  submit(item)            -> waiting
  scheduler  assign(worker, items)   -> waiting -> that worker's assignments (one atomic step)
  worker     pull(worker)            -> the items assigned to it (at-least-once)
  worker     publish({sched: batch}) -> token deltas, one write per engine step
  scheduler  read_deltas(sched)      -> relays them to clients
  worker     ack(worker, ids)        -> finished on the worker
  scheduler  finish(*ids)            -> forgotten
  scheduler  reclaim_dead()          -> items of workers whose heartbeat expired (re-queued)
Values are checked on the way out (wire/codec.py): garbage is quarantined and skipped.
Errors: QueueUnavailable (cannot reach the backend: retry with backoff), QueueError.
Values are protobuf messages (dynabatch.v1.worker_pb2), stored as bytes, never pickle.
"""
from __future__ import annotations

from typing import Protocol

from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkerControl, WorkerFeedback, WorkItem


class QueueError(Exception):
    """The queue backend failed an operation."""


class QueueUnavailable(QueueError):
    """The queue backend cannot be reached right now; retry with backoff."""


class Queue(Protocol):
    # -- scheduler side
    async def submit(self, item: WorkItem) -> None:
        """Store a validated request and add it to the waiting set."""

    async def waiting(self) -> list[WorkItem]:
        """All waiting requests, oldest first (the policy's input)."""

    async def assign(self, worker_id: str, items: list[WorkItem]) -> list[str]:
        """Move items from waiting to the worker, atomically per item; returns the ids moved.

        An item no longer waiting (cancelled, or taken by another scheduler) is skipped."""

    async def remove_waiting(self, request_id: str) -> bool:
        """Take a request out of the waiting set (cancel, expiry); False if it was not waiting."""

    async def requeue(self, item: WorkItem) -> None:
        """Put a request back into the waiting set (preempted or reclaimed)."""

    async def read_deltas(self, scheduler_id: str, timeout_s: float) -> list[TokenDeltaBatch]:
        """Token deltas published for this scheduler since the last call (waits up to timeout)."""

    async def send_control(self, worker_id: str, control: WorkerControl) -> None:
        """Deliver a control message (cancellations) to a worker."""

    async def workers(self) -> list[WorkerFeedback]:
        """The latest feedback of every worker whose heartbeat has not expired."""

    async def finish(self, *request_ids: str) -> None:
        """Forget requests that have ended (one queue write for all of them)."""

    async def reclaim_dead(self) -> list[WorkItem]:
        """Take what workers whose heartbeat expired still held (assigned, unfinished); each dead
        worker is reclaimed by exactly one caller."""

    async def recover(self, scheduler_id: str) -> list[WorkItem]:
        """Requests of this scheduler still in the queue (waiting or assigned): after a restart."""

    async def trim_deltas(self, scheduler_id: str, before_unix_ms: int) -> None:
        """Drop this scheduler's token deltas published before that time (already relayed)."""

    async def epoch(self) -> str:
        """A token that changes only when the backend lost its data (Redis restarted empty)."""

    # -- worker side
    async def heartbeat(self, feedback: WorkerFeedback, ttl_s: float) -> None:
        """Publish feedback; the worker counts as alive for ttl_s."""

    async def pull(self, worker_id: str, max_items: int, timeout_s: float) -> list[WorkItem]:
        """New items assigned to this worker (waits up to timeout_s when there are none)."""

    async def read_control(self, worker_id: str) -> list[WorkerControl]:
        """Control messages sent to this worker since the last call."""

    async def publish(self, batches: dict[str, TokenDeltaBatch]) -> None:
        """Publish one step's deltas, grouped by the scheduler that relays them, in one write."""

    async def ack(self, worker_id: str, request_ids: list[str]) -> None:
        """Mark requests finished on this worker (they will not be re-delivered)."""

    async def close(self) -> None:
        """Release connections."""


def connect(redis_url: str | None, prefix: str = "dynabatch:") -> Queue:
    """The Redis backend for a URL, else the in-process backend (the embedded default)."""
    if redis_url:
        from dynabatch.wire.redis_queue import RedisQueue
        return RedisQueue(redis_url, prefix=prefix)
    from dynabatch.wire.memory_queue import MemoryQueue
    return MemoryQueue()
