"""The Redis queue's round-trip savings keep its answers exact (real Redis)."""
from __future__ import annotations

import uuid

from dynabatch.v1.worker_pb2 import WorkerFeedback, WorkItem
from dynabatch.wire.redis_queue import RedisQueue


def item(rid: str, at: int) -> WorkItem:
    return WorkItem(request_id=rid, model="m", prompt_token_ids=[1, 2], max_tokens=4,
                    scheduler_id="s", arrival_unix_ns=at)


async def test_a_submit_hands_the_next_waiting_read_its_snapshot(redis_url):
    q = RedisQueue(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    zranges = []
    real = q.redis.zrange

    async def counted(*a, **k):
        zranges.append(a)
        return await real(*a, **k)
    q.redis.zrange = counted
    try:
        await q.heartbeat(WorkerFeedback(worker_id="w", model="m"), ttl_s=5)
        await q.submit(item("a", 1))
        await q.submit(item("b", 2))
        assert [i.request_id for i in await q.waiting()] == ["a", "b"]
        assert zranges == []                       # the submit's transaction read the set
        assert await q.assign("w", [item("a", 1)]) == ["a"]
        assert [i.request_id for i in await q.waiting()] == ["b"]   # read again after a move
        assert len(zranges) == 1
        assert [i.request_id for i in await q.waiting()] == ["b"]   # a snapshot serves once
        assert len(zranges) == 2
        assert [fb.worker_id for fb in await q.workers()] == ["w"]
    finally:
        await q.purge()
        await q.close()
