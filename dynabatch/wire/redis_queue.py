"""The Redis backend of the queue (redis-py asyncio).

Keys (prefix configurable, default "dynabatch:"):
  req:{id}        hash   item (WorkItem bytes), state (waiting|assigned|cancelled), worker
  waiting         zset   waiting request ids, scored by arrival time (ns)
  assign:{worker} stream assignments; consumer group "workers" gives at-least-once delivery:
                         an entry stays pending until the worker acks it (finished)
  ctl:{worker}    list   WorkerControl bytes (cancellations)
  out:{scheduler} stream TokenDeltaBatch bytes for the requests that scheduler relays
  worker:{id}     string WorkerFeedback bytes, expires with the heartbeat TTL
  workers         zset   worker ids scored by heartbeat expiry (ms)
One waiting set instead of one per bin: bins are the policy's (re-estimated) view of a request,
not a property that should be frozen into a key at submit time.
"""
from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkerControl, WorkerFeedback, WorkItem

GROUP = "workers"
OUT_MAXLEN = 100_000

# Move waiting items to a worker's stream, each only if it is still waiting (atomic per call).
_ASSIGN = """
local moved = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HSET', ARGV[1] .. id, 'item', ARGV[i + 1], 'state', 'assigned', 'worker', ARGV[2])
    redis.call('XADD', KEYS[2], '*', 'id', id, 'item', ARGV[i + 1])
    moved[#moved + 1] = id
  end
end
return moved
"""


class RedisQueue:
    def __init__(self, url: str, prefix: str = "dynabatch:") -> None:
        self.redis = aioredis.from_url(url, decode_responses=False)
        self.p = prefix
        self._assign_script = self.redis.register_script(_ASSIGN)
        self._items: dict[str, WorkItem] = {}       # parsed waiting items, by id
        self._out_last: dict[str, bytes] = {}       # scheduler -> last stream id read
        self._groups: set[str] = set()              # workers whose consumer group exists
        self._entries: dict[str, bytes] = {}        # request id -> assign stream entry id

    def _k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    # -- scheduler side
    async def submit(self, item: WorkItem) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("req", item.request_id),
                      mapping={"item": item.SerializeToString(), "state": "waiting"})
            pipe.zadd(self._k("waiting"), {item.request_id: item.arrival_unix_ns})
            await pipe.execute()

    async def waiting(self) -> list[WorkItem]:
        ids = [i.decode() for i in await self.redis.zrange(self._k("waiting"), 0, -1)]
        missing = [i for i in ids if i not in self._items]
        if missing:
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in missing:
                    pipe.hget(self._k("req", rid), "item")
                for rid, raw in zip(missing, await pipe.execute()):
                    if raw is not None:
                        self._items[rid] = WorkItem.FromString(raw)
        self._items = {i: self._items[i] for i in ids if i in self._items}
        return list(self._items.values())

    async def assign(self, worker_id: str, items: list[WorkItem]) -> list[str]:
        if not items:
            return []
        args: list = [self._k("req", ""), worker_id]
        for item in items:
            args += [item.request_id, item.SerializeToString()]
        moved = await self._assign_script(
            keys=[self._k("waiting"), self._k("assign", worker_id)], args=args)
        for rid in moved:
            self._items.pop(rid.decode(), None)
        return [m.decode() for m in moved]

    async def remove_waiting(self, request_id: str) -> bool:
        self._items.pop(request_id, None)
        removed = await self.redis.zrem(self._k("waiting"), request_id)
        if removed:
            await self.redis.hset(self._k("req", request_id), "state", "cancelled")
        return bool(removed)

    async def requeue(self, item: WorkItem) -> None:
        self._items.pop(item.request_id, None)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("req", item.request_id),
                      mapping={"item": item.SerializeToString(), "state": "waiting"})
            pipe.zadd(self._k("waiting"), {item.request_id: item.arrival_unix_ns})
            await pipe.execute()

    async def read_deltas(self, scheduler_id: str, timeout_s: float) -> list[TokenDeltaBatch]:
        key = self._k("out", scheduler_id)
        last = self._out_last.get(scheduler_id, b"0-0")
        block = max(1, int(timeout_s * 1000)) if timeout_s > 0 else None
        reply = await self.redis.xread({key: last}, count=1000, block=block)
        batches = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._out_last[scheduler_id] = entry_id
                batches.append(TokenDeltaBatch.FromString(fields[b"d"]))
        return batches

    async def send_control(self, worker_id: str, control: WorkerControl) -> None:
        await self.redis.rpush(self._k("ctl", worker_id), control.SerializeToString())

    async def workers(self) -> list[WorkerFeedback]:
        now_ms = int(time.time() * 1000)
        key = self._k("workers")
        await self.redis.zremrangebyscore(key, "-inf", now_ms)
        ids = [i.decode() for i in await self.redis.zrange(key, 0, -1)]
        if not ids:
            return []
        raws = await self.redis.mget([self._k("worker", i) for i in ids])
        return [WorkerFeedback.FromString(r) for r in raws if r is not None]

    async def finish(self, request_id: str) -> None:
        self._items.pop(request_id, None)
        await self.redis.delete(self._k("req", request_id))

    # -- worker side
    async def heartbeat(self, feedback: WorkerFeedback, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._k("worker", feedback.worker_id), feedback.SerializeToString(), px=ttl_ms)
            pipe.zadd(self._k("workers"), {feedback.worker_id: int(time.time() * 1000) + ttl_ms})
            await pipe.execute()

    async def _ensure_group(self, worker_id: str) -> None:
        if worker_id in self._groups:
            return
        try:
            await self.redis.xgroup_create(self._k("assign", worker_id), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(worker_id)

    async def pull(self, worker_id: str, max_items: int, timeout_s: float) -> list[WorkItem]:
        await self._ensure_group(worker_id)
        block = max(1, int(timeout_s * 1000)) if timeout_s > 0 else None
        reply = await self.redis.xreadgroup(GROUP, worker_id, {self._k("assign", worker_id): ">"},
                                            count=max_items, block=block)
        items = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                item = WorkItem.FromString(fields[b"item"])
                self._entries[item.request_id] = entry_id
                items.append(item)
        return items

    async def read_control(self, worker_id: str) -> list[WorkerControl]:
        raws = await self.redis.lpop(self._k("ctl", worker_id), 1000)
        return [WorkerControl.FromString(r) for r in raws or []]

    async def publish(self, batches: dict[str, TokenDeltaBatch]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for scheduler_id, batch in batches.items():
                pipe.xadd(self._k("out", scheduler_id), {"d": batch.SerializeToString()},
                          maxlen=OUT_MAXLEN, approximate=True)
            await pipe.execute()

    async def ack(self, worker_id: str, request_ids: list[str]) -> None:
        entries = [e for e in (self._entries.pop(r, None) for r in request_ids) if e is not None]
        if entries:
            key = self._k("assign", worker_id)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(key, GROUP, *entries)
                pipe.xdel(key, *entries)
                await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()

    async def purge(self) -> int:
        """Delete every key under this queue's prefix (tests, `dynabatch up --redis-url`)."""
        n = 0
        async for key in self.redis.scan_iter(match=self.p + "*", count=500):
            n += await self.redis.delete(key)
        return n
