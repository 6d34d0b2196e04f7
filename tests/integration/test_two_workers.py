"""The scheduler's batching loop with two workers and fake feedback (no engine, no gRPC).

The real loop, queue and policy; only the workers' heartbeats are written by the test, so each
dispatch rule can be checked against feedback we control.
"""
from __future__ import annotations

import time

import pytest

from dynabatch.scheduler_svc.batching import BatchingLoop
from dynabatch.scheduler_svc.policy import PolicyConfig, make_policy
from dynabatch.scheduler_svc.requests import RequestTable
from dynabatch.v1.worker_pb2 import WorkerFeedback, WorkItem
from dynabatch.wire.memory_queue import MemoryQueue

SCHED = "sched-test"


def feedback(worker: str, used: int, total: int = 1000, age_s: float = 0.0,
             accepting: bool = True, steps: int = 1, step_ms: float = 10.0) -> WorkerFeedback:
    return WorkerFeedback(worker_id=worker, model="m", kv_blocks_total=total, kv_blocks_used=used,
                          kv_block_size=16, max_running=256, max_model_len=4096,
                          decode_step_ms=step_ms, decode_batch_size=4, steps=steps,
                          unix_ns=int((time.time() - age_s) * 1e9), accepting=accepting)


async def setup(policy: str, n: int, prompt: int = 64, max_tokens: int = 64, **cfg):
    queue, table = MemoryQueue(), RequestTable()
    loop = BatchingLoop(queue, make_policy(policy, PolicyConfig(**cfg)), table, SCHED)
    loop.FEEDBACK_MAX_AGE_S = 0.0     # these tests change the feedback between two ticks
    now = time.time_ns()
    for i in range(n):
        item = WorkItem(request_id=f"r{i}", model="m", prompt_token_ids=[1] * prompt,
                        max_tokens=max_tokens, scheduler_id=SCHED, arrival_unix_ns=now + i,
                        priority=2)
        table.add(item)
        await queue.submit(item)
    return queue, loop


async def assigned(queue: MemoryQueue, worker: str) -> list[str]:
    return [i.request_id for i in await queue.pull(worker, 10_000, 0)]


@pytest.mark.parametrize("policy", ["dynamic", "fcfs", "multibin"])
async def test_headroom_decides_who_gets_more(policy):
    queue, loop = await setup(policy, 40)
    await queue.heartbeat(feedback("roomy", used=0), ttl_s=5)
    await queue.heartbeat(feedback("full", used=960), ttl_s=5)
    await loop.tick(time.time())
    roomy, full = await assigned(queue, "roomy"), await assigned(queue, "full")
    assert len(roomy) > len(full)
    assert not set(roomy) & set(full)
    assert len(roomy) + len(full) + len(await queue.waiting()) == 40   # nothing lost


@pytest.mark.parametrize("reserve_output, per_request", [(True, 8), (False, 4)])
async def test_memory_budget_is_never_exceeded(reserve_output, per_request):
    # 64 prompt tokens = 4 blocks of 16; with output reservation and no history the prediction
    # is max_tokens, 64 more = 8 blocks. 100 free blocks hold 12 or 25, however long the queue.
    queue, loop = await setup("dynamic", 40, reserve_output=reserve_output)
    await queue.heartbeat(feedback("w", used=900), ttl_s=5)
    await loop.tick(time.time())
    got = await assigned(queue, "w")
    assert len(got) == 100 // per_request
    assert len(await queue.waiting()) == 40 - len(got)


async def test_stale_and_draining_workers_get_nothing():
    queue, loop = await setup("dynamic", 10)
    await queue.heartbeat(feedback("stale", used=0, age_s=60), ttl_s=120)   # alive key, old beat
    await queue.heartbeat(feedback("draining", used=0, accepting=False), ttl_s=5)
    await loop.tick(time.time())
    assert await assigned(queue, "stale") == []
    assert await assigned(queue, "draining") == []
    assert len(await queue.waiting()) == 10                  # they wait for a live worker
    await queue.heartbeat(feedback("fresh", used=0), ttl_s=5)
    await loop.tick(time.time())
    assert len(await assigned(queue, "fresh")) == 10


async def test_expired_heartbeat_removes_the_worker():
    queue, loop = await setup("fcfs", 4)
    await queue.heartbeat(feedback("gone", used=0), ttl_s=0.01)
    time.sleep(0.02)
    await loop.tick(time.time())
    assert loop.workers == [] and await assigned(queue, "gone") == []


async def test_fcfs_respects_max_num_seqs_across_ticks():
    queue, loop = await setup("fcfs", 30, max_num_seqs=8)
    await queue.heartbeat(feedback("a", used=0), ttl_s=5)
    await queue.heartbeat(feedback("b", used=0), ttl_s=5)
    for _ in range(3):                 # the scheduler's own view of assigned requests bounds it
        await loop.tick(time.time())
    a, b = await assigned(queue, "a"), await assigned(queue, "b")
    assert len(a) == 8 and len(b) == 8
    assert sorted(a + b, key=lambda r: int(r[1:])) == [f"r{i}" for i in range(16)]   # FCFS order


async def test_a_tick_reuses_feedback_read_just_before():
    """Workers write feedback once per heartbeat: a tick right after another does not wait a
    round trip for it again; one after FEEDBACK_MAX_AGE_S does."""
    queue, loop = await setup("fcfs", 2)
    loop.FEEDBACK_MAX_AGE_S = 0.05
    reads = []
    real = queue.workers

    async def counted():
        reads.append(1)
        return await real()
    queue.workers = counted
    await queue.heartbeat(feedback("w", used=0), ttl_s=5)
    await loop.tick(time.time())
    await loop.tick(time.time())
    assert len(reads) == 1
    assert [v.worker_id for v in loop.workers] == ["w"]     # the reused feedback is used
    time.sleep(0.06)
    await loop.tick(time.time())
    assert len(reads) == 2


@pytest.mark.parametrize("policy, sent", [("dynamic", True), ("fcfs", False)])
async def test_the_step_prefill_cap_goes_to_the_worker_once(policy, sent):
    """TPOT 10 ms, a 6-ms decode step, 50k prompt tokens/s: a dynamic policy sends the cap
    (policy/prefill_cap.py) in a WorkerControl, once while the worker's feedback still shows the
    old one; fcfs (vLLM's fixed budget) sends none."""
    queue, loop = await setup(policy, 4, tpot_target_s=0.010, eps=0.0)
    fb = feedback("w", used=0, step_ms=6.0)
    fb.prefill_tokens_per_s, fb.step_prefill_tokens = 50_000, 8192
    await queue.heartbeat(fb, ttl_s=5)
    for i in range(3):                   # a decision per tick: each has an arrival to place
        await loop.tick(time.time())
        item = WorkItem(request_id=f"x{i}", model="m", prompt_token_ids=[1] * 8, max_tokens=4,
                        scheduler_id=SCHED, priority=2, arrival_unix_ns=time.time_ns())
        loop.table.add(item)
        await queue.submit(item)
    caps = [c.step_prefill_tokens for c in await queue.read_control("w")]
    assert caps == ([200] if sent else [])
