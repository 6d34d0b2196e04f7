"""The in-process queue backend: the same semantics as Redis, for one process (`dynabatch up`)."""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkerControl, WorkerFeedback, WorkItem


class _Mailbox:
    """A list of messages and an event that is set while it is non-empty."""

    def __init__(self) -> None:
        self.items: list = []
        self.ready = asyncio.Event()

    def put(self, values: list) -> None:
        self.items.extend(values)
        if self.items:
            self.ready.set()

    async def take(self, limit: int, timeout_s: float) -> list:
        if not self.items and timeout_s > 0:    # (wait_for would cost a task per call)
            timer = asyncio.get_running_loop().call_later(timeout_s, self.ready.set)
            try:
                await self.ready.wait()
            finally:
                timer.cancel()
        taken, self.items = self.items[:limit], self.items[limit:]
        if not self.items:
            self.ready.clear()
        return taken


class MemoryQueue:
    """Embedded backend. Messages are copied (serialised) so no object is shared across sides."""

    def __init__(self) -> None:
        self._waiting: dict[str, WorkItem] = {}       # insertion order = arrival order
        self._pending: dict[str, dict[str, bytes]] = defaultdict(dict)   # worker -> unacked
        self._assign: dict[str, _Mailbox] = defaultdict(_Mailbox)
        self._control: dict[str, list[WorkerControl]] = defaultdict(list)
        self._out: dict[str, _Mailbox] = defaultdict(_Mailbox)
        self._workers: dict[str, tuple[float, bytes]] = {}

    async def submit(self, item: WorkItem) -> None:
        self._waiting[item.request_id] = WorkItem.FromString(item.SerializeToString())

    async def waiting(self) -> list[WorkItem]:
        return list(self._waiting.values())      # parsed once (the Redis backend caches too)

    async def assign(self, worker_id: str, items: list[WorkItem]) -> list[str]:
        expiry = self._workers.get(worker_id, (0.0, b""))[0]
        if expiry <= time.monotonic():
            return []                       # dead or unknown: its work would never run
        moved, sent, pending = [], [], self._pending[worker_id]
        for item in items:
            if self._waiting.pop(item.request_id, None) is None:
                continue
            data = item.SerializeToString()
            pending[item.request_id] = data
            sent.append(data)
            moved.append(item.request_id)
        self._assign[worker_id].put(sent)       # one wake for the whole assignment
        return moved

    async def remove_waiting(self, request_id: str) -> bool:
        return self._waiting.pop(request_id, None) is not None

    async def requeue(self, item: WorkItem) -> None:
        for pending in self._pending.values():
            pending.pop(item.request_id, None)
        self._waiting[item.request_id] = WorkItem.FromString(item.SerializeToString())

    async def read_deltas(self, scheduler_id: str, timeout_s: float) -> list[TokenDeltaBatch]:
        raw = await self._out[scheduler_id].take(1 << 30, timeout_s)
        return [TokenDeltaBatch.FromString(b) for b in raw]

    async def send_control(self, worker_id: str, control: WorkerControl) -> None:
        self._control[worker_id].append(WorkerControl.FromString(control.SerializeToString()))

    async def workers(self) -> list[WorkerFeedback]:
        now = time.monotonic()
        return [WorkerFeedback.FromString(b) for exp, b in self._workers.values() if exp > now]

    async def finish(self, *request_ids: str) -> None:
        for rid in request_ids:
            self._waiting.pop(rid, None)

    async def reclaim_dead(self) -> list[WorkItem]:
        now = time.monotonic()
        dead = [w for w, (exp, _) in self._workers.items() if exp <= now]
        items = []
        for worker_id in dead:
            del self._workers[worker_id]
            items += [WorkItem.FromString(b) for b in self._pending.pop(worker_id, {}).values()]
            self._assign.pop(worker_id, None)
            self._control.pop(worker_id, None)
        return items

    async def recover(self, scheduler_id: str) -> list[WorkItem]:
        return []          # nothing outlives the process

    async def trim_deltas(self, scheduler_id: str, before_unix_ms: int) -> None:
        return None        # read deltas are gone already

    async def epoch(self) -> str:
        return "memory"

    async def heartbeat(self, feedback: WorkerFeedback, ttl_s: float) -> None:
        self._workers[feedback.worker_id] = (time.monotonic() + ttl_s, feedback.SerializeToString())

    async def pull(self, worker_id: str, max_items: int, timeout_s: float) -> list[WorkItem]:
        raw = await self._assign[worker_id].take(max_items, timeout_s)
        return [WorkItem.FromString(b) for b in raw]

    async def read_control(self, worker_id: str) -> list[WorkerControl]:
        msgs, self._control[worker_id] = self._control[worker_id], []
        return msgs

    async def publish(self, batches: dict[str, TokenDeltaBatch]) -> None:
        for scheduler_id, batch in batches.items():
            self._out[scheduler_id].put([batch.SerializeToString()])

    async def ack(self, worker_id: str, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._pending[worker_id].pop(rid, None)

    async def close(self) -> None:
        return None
