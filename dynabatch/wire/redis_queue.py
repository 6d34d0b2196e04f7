"""The Redis backend of the queue (redis-py asyncio).

Keys (prefix configurable, default "dynabatch:"):
  req:{id}        hash   item (WorkItem bytes), state (waiting|assigned|cancelled), worker
  waiting         zset   waiting request ids, scored by arrival time (ns)
  assign:{worker} stream assignments; consumer group "workers" gives at-least-once delivery:
                         an entry stays until the worker acks it (finished); when the worker's
                         heartbeat expires a scheduler reclaims what is left (redis_scripts.RECLAIM)
  ctl:{worker}    list   WorkerControl bytes (cancellations)
  out:{scheduler} stream TokenDeltaBatch bytes for the requests that scheduler relays
  worker:{id}     string WorkerFeedback bytes, expires with the heartbeat TTL
  workers         zset   worker ids scored by heartbeat expiry (ms)
  epoch           string a random token per dataset: when it changes, Redis lost its data
  quarantine      list   JSON records of values that did not decode (newest first, bounded)
One waiting set instead of one per bin: bins are the policy's (re-estimated) view of a request,
not a property that should be frozen into a key at submit time.

Connection errors surface as QueueUnavailable; callers retry with backoff.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from dynabatch.v1.worker_pb2 import TokenDeltaBatch, WorkerControl, WorkerFeedback, WorkItem
from dynabatch.wire import redis_scripts
from dynabatch.wire.codec import QUARANTINE_KEEP, Garbage, decode, quarantine_record
from dynabatch.wire.redis_errors import guarded, redact

log = logging.getLogger("dynabatch.queue")
GROUP = "workers"
OUT_MAXLEN = 100_000
MAX_CONNECTIONS = 32


class RedisQueue:
    def __init__(self, url: str, prefix: str = "dynabatch:") -> None:
        # AUTH (redis://user:pass@...) and TLS (rediss://, ?ssl_ca_certs=...) come with the URL.
        # A blocking pool: under a burst, calls wait for a free connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=10, decode_responses=False,
            socket_connect_timeout=2, socket_timeout=10, health_check_interval=5)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.url = redact(url)
        self.p = prefix
        self._assign_script = self.redis.register_script(redis_scripts.ASSIGN)
        self._reclaim_script = self.redis.register_script(redis_scripts.RECLAIM)
        self._epoch_script = self.redis.register_script(redis_scripts.EPOCH)
        self._workers_script = self.redis.register_script(redis_scripts.LIVE_WORKERS)
        self._items: dict[str, WorkItem] = {}       # parsed waiting items, by id
        # The waiting ids as the last submit's transaction read them, right after its writes:
        # the batching tick that submit wakes takes them instead of reading the set again.
        # Not kept when this client changed the set otherwise while the write was in flight.
        self._fresh_ids: list[bytes] | None = None
        self._moves = 0                             # assign / remove / requeue calls so far
        self._out_last: dict[str, bytes] = {}       # scheduler -> last stream id read
        self._groups: set[str] = set()              # workers whose consumer group exists
        self._entries: dict[str, bytes] = {}        # request id -> assign stream entry id
        self._submits: list[tuple[WorkItem, asyncio.Future]] = []   # waiting for one write
        self._tasks: set[asyncio.Task] = set()

    def _k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    async def quarantine(self, kind: str, key: str, raw: object, why: str) -> None:
        """Keep a bad value for inspection (bounded list) and log it; never raises."""
        log.warning("quarantined a bad %s from %s: %s", kind, key, why)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(self._k("quarantine"), quarantine_record(kind, key, raw, why))
                pipe.ltrim(self._k("quarantine"), 0, QUARANTINE_KEEP - 1)
                await pipe.execute()
        except RedisError as e:
            log.warning("could not quarantine (%s)", type(e).__name__)

    async def _decoded(self, cls, raw, key: str):
        """The message in `raw`, or None once the bad value is quarantined (the caller decides
        what else to drop)."""
        try:
            return decode(cls, raw)
        except Garbage as e:
            await self.quarantine(cls.__name__, key, raw, str(e))
            return None

    # -- scheduler side
    @guarded
    async def submit(self, item: WorkItem) -> None:
        """Submits made in the same event-loop turn share one transaction (one round trip)."""
        future = asyncio.get_running_loop().create_future()
        self._submits.append((item, future))
        if len(self._submits) == 1:
            asyncio.get_running_loop().call_soon(self._spawn_write)
        await future

    def _spawn_write(self) -> None:
        task = asyncio.ensure_future(self._write_submits())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_submits(self) -> None:
        batch, self._submits = self._submits, []
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for item, _ in batch:
                    self._put_waiting(pipe, item)
                pipe.zrange(self._k("waiting"), 0, -1)
                moves = self._moves
                fresh = (await pipe.execute())[-1]
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        else:
            self._fresh_ids = fresh if moves == self._moves else None
            for item, future in batch:
                self._items[item.request_id] = item   # waiting() need not read it back
                if not future.done():
                    future.set_result(None)

    def _moved(self) -> None:
        self._moves += 1
        self._fresh_ids = None

    def _put_waiting(self, pipe, item: WorkItem) -> None:
        pipe.hset(self._k("req", item.request_id),
                  mapping={"item": item.SerializeToString(), "state": "waiting"})
        pipe.zadd(self._k("waiting"), {item.request_id: item.arrival_unix_ns})

    @guarded
    async def waiting(self) -> list[WorkItem]:
        raw_ids, self._fresh_ids = self._fresh_ids, None
        if raw_ids is None:
            raw_ids = await self.redis.zrange(self._k("waiting"), 0, -1)
        ids = [i.decode(errors="replace") for i in raw_ids]
        missing = [(i, r) for i, r in zip(ids, raw_ids) if i not in self._items]
        if missing:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _rid, raw_id in missing:
                    pipe.hget(self._k("req", "").encode() + raw_id, "item")
                raws = await pipe.execute()
            for (rid, raw_id), raw in zip(missing, raws):
                await self._load_waiting(rid, raw_id, raw)
        self._items = {i: self._items[i] for i in ids if i in self._items}
        return list(self._items.values())

    async def _load_waiting(self, rid: str, raw_id: bytes, raw: bytes | None) -> None:
        try:
            if raw is None:     # ended meanwhile (its id leaves the set first), or an orphan
                if await self.redis.zscore(self._k("waiting"), raw_id) is None:
                    return
                raise Garbage("waiting id without a req hash")
            item = decode(WorkItem, raw)
            if item.request_id != rid:
                raise Garbage(f"req hash of {rid!r} holds the item of {item.request_id!r}")
        except Garbage as e:
            await self.quarantine("WorkItem", self._k("req", rid), raw, str(e))
            await self.redis.zrem(self._k("waiting"), raw_id)
            await self.redis.delete(self._k("req", "").encode() + raw_id)
            return
        self._items[rid] = item

    @guarded
    async def assign(self, worker_id: str, items: list[WorkItem]) -> list[str]:
        if not items:
            return []
        self._moved()
        args: list = [self._k("req", ""), worker_id, int(time.time() * 1000)]
        for item in items:
            args += [item.request_id, item.SerializeToString()]
        moved = await self._assign_script(
            keys=[self._k("waiting"), self._k("assign", worker_id), self._k("workers")], args=args)
        for rid in moved:
            self._items.pop(rid.decode(), None)
        return [m.decode() for m in moved]

    @guarded
    async def remove_waiting(self, request_id: str) -> bool:
        self._items.pop(request_id, None)
        self._moved()
        removed = await self.redis.zrem(self._k("waiting"), request_id)
        if removed:
            await self.redis.hset(self._k("req", request_id), "state", "cancelled")
        return bool(removed)

    @guarded
    async def requeue(self, item: WorkItem) -> None:
        self._items.pop(item.request_id, None)
        self._moved()
        async with self.redis.pipeline(transaction=True) as pipe:
            self._put_waiting(pipe, item)
            await pipe.execute()

    @guarded
    async def read_deltas(self, scheduler_id: str, timeout_s: float) -> list[TokenDeltaBatch]:
        key = self._k("out", scheduler_id)
        last = self._out_last.get(scheduler_id, b"0-0")
        block = max(1, int(timeout_s * 1000)) if timeout_s > 0 else None
        reply = await self.redis.xread({key: last}, count=1000, block=block)
        batches = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._out_last[scheduler_id] = entry_id
                try:
                    batches.append(decode(TokenDeltaBatch, fields.get(b"d")))
                except Garbage as e:
                    await self.quarantine("TokenDeltaBatch", key, fields, str(e))
                    await self.redis.xdel(key, entry_id)
        return batches

    @guarded
    async def send_control(self, worker_id: str, control: WorkerControl) -> None:
        await self.redis.rpush(self._k("ctl", worker_id), control.SerializeToString())

    @guarded
    async def workers(self) -> list[WorkerFeedback]:
        """One round trip (the batching tick waits on it before every decision)."""
        flat = await self._workers_script(keys=[self._k("workers")],
                                          args=[self._k("worker", ""), int(time.time() * 1000)])
        feedback = []
        for raw_id, raw in zip(flat[::2], flat[1::2]):
            if raw is None:
                continue
            key = self._k("worker", raw_id.decode(errors="replace"))
            fb = await self._decoded(WorkerFeedback, raw, key)
            if fb is None:
                await self.redis.delete(key)
            else:
                feedback.append(fb)
        return feedback

    @guarded
    async def finish(self, *request_ids: str) -> None:
        if not request_ids:
            return
        for rid in request_ids:
            self._items.pop(rid, None)
        await self.redis.delete(*(self._k("req", rid) for rid in request_ids))

    @guarded
    async def reclaim_dead(self) -> list[WorkItem]:
        flat = await self._reclaim_script(keys=[self._k("workers")],
                                          args=[self.p, int(time.time() * 1000)])
        items = []
        for worker, raw in zip(flat[::2], flat[1::2]):
            item = await self._decoded(WorkItem, raw,
                                       self._k("assign", worker.decode(errors="replace")))
            if item is not None:
                items.append(item)
        return items

    @guarded
    async def recover(self, scheduler_id: str) -> list[WorkItem]:
        keys = [k async for k in self.redis.scan_iter(match=self._k("req", "*"), count=1000)]
        items = []
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.hmget(key, "item", "state")
                rows = await pipe.execute()
            for key, (raw, state) in zip(chunk, rows):
                item = await self._recovered(key, raw, state)
                if item is not None and item.scheduler_id == scheduler_id:
                    items.append(item)
        return items

    async def _recovered(self, key: bytes, raw, state) -> WorkItem | None:
        if raw is None or state == b"cancelled":
            return None
        item = await self._decoded(WorkItem, raw, key.decode(errors="replace"))
        if item is None:
            await self.redis.delete(key)
        return item

    @guarded
    async def trim_deltas(self, scheduler_id: str, before_unix_ms: int) -> None:
        await self.redis.xtrim(self._k("out", scheduler_id), minid=f"{max(0, before_unix_ms)}-0",
                               approximate=True)

    @guarded
    async def epoch(self) -> str:
        value = await self._epoch_script(keys=[self._k("epoch")], args=[uuid.uuid4().hex])
        return value.decode(errors="replace")

    # -- worker side
    @guarded
    async def heartbeat(self, feedback: WorkerFeedback, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._k("worker", feedback.worker_id), feedback.SerializeToString(), px=ttl_ms)
            pipe.zadd(self._k("workers"), {feedback.worker_id: int(time.time() * 1000) + ttl_ms})
            await pipe.execute()

    async def _ensure_group(self, worker_id: str) -> bool:
        """Create the consumer group if needed; True when it was (re)created just now."""
        if worker_id in self._groups:
            return False
        try:
            await self.redis.xgroup_create(self._k("assign", worker_id), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(worker_id)
        return True

    @guarded
    async def pull(self, worker_id: str, max_items: int, timeout_s: float) -> list[WorkItem]:
        # After (re)creating the group, first take back this consumer's own unacknowledged
        # entries ("0"): a worker restarted under the same id resumes what it had.
        since = "0" if await self._ensure_group(worker_id) else ">"
        block = max(1, int(timeout_s * 1000)) if timeout_s > 0 and since == ">" else None
        key = self._k("assign", worker_id)
        try:
            reply = await self.redis.xreadgroup(GROUP, worker_id, {key: since},
                                                count=max_items, block=block)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._groups.discard(worker_id)      # the stream was reclaimed or Redis restarted
            return []
        items = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                item = await self._assigned(key, entry_id, fields)
                if item is not None:
                    items.append(item)
        return items

    async def _assigned(self, key: str, entry_id: bytes, fields: dict) -> WorkItem | None:
        try:
            item = decode(WorkItem, fields.get(b"item"))
        except Garbage as e:
            await self.quarantine("WorkItem", key, fields, str(e))
            await self.redis.xack(key, GROUP, entry_id)
            await self.redis.xdel(key, entry_id)
            return None
        self._entries[item.request_id] = entry_id
        return item

    @guarded
    async def read_control(self, worker_id: str) -> list[WorkerControl]:
        key = self._k("ctl", worker_id)
        controls = [await self._decoded(WorkerControl, raw, key)
                    for raw in await self.redis.lpop(key, 1000) or []]
        return [c for c in controls if c is not None]

    @guarded
    async def publish(self, batches: dict[str, TokenDeltaBatch]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for scheduler_id, batch in batches.items():
                pipe.xadd(self._k("out", scheduler_id), {"d": batch.SerializeToString()},
                          maxlen=OUT_MAXLEN, approximate=True)
            await pipe.execute()

    @guarded
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
