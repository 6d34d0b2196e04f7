"""The worker loop against the in-process queue: assignments made while it steps are picked up
(the pull stays in flight across steps), and on stop it drains: every request it took finishes
with all its tokens, in order, none twice."""
from __future__ import annotations

import asyncio
from collections import defaultdict

from dynabatch.v1.worker_pb2 import WorkerFeedback, WorkItem
from dynabatch.wire.memory_queue import MemoryQueue
from dynabatch.worker_svc.engine_client import EngineProcess
from dynabatch.worker_svc.engine_proc import EngineSpec
from dynabatch.worker_svc.config import WorkerConfig
from dynabatch.worker_svc.loop import WorkerLoop

OUT = 30


def _item(i: int) -> WorkItem:
    return WorkItem(request_id=f"r{i}", model="m", prompt_token_ids=[1, 2, 3], max_tokens=OUT,
                    ignore_eos=True, scheduler_id="s")


async def _assign(q: MemoryQueue, ids: range) -> None:
    for i in ids:
        await q.submit(_item(i))
    assert await q.assign("w", [_item(i) for i in ids]) == [f"r{i}" for i in ids]


async def _run() -> dict[str, list]:
    q = MemoryQueue()
    engine = EngineProcess(EngineSpec("fake", "m", {"step_delay_s": 0.002}))
    loop = WorkerLoop(q, engine, WorkerConfig("w", "m"))
    stop = asyncio.Event()
    await q.heartbeat(WorkerFeedback(worker_id="w", model="m"), ttl_s=30)  # assignable
    await _assign(q, range(4))
    task = asyncio.create_task(loop.run(stop))
    for _ in range(200):                       # bounded: until the first batch is stepping
        if loop.has_work():
            break
        await asyncio.sleep(0.005)
    await _assign(q, range(4, 8))              # arrives while the engine steps
    await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)
    got: dict[str, list] = defaultdict(list)
    for batch in await q.read_deltas("s", 0.1):
        for d in batch.deltas:
            assert d.offset == len(got[d.request_id]), "a gap or a repeat"
            got[d.request_id].extend(d.token_ids)
            if d.finish_reason:
                got[d.request_id].append("end")
    return got


def test_picks_up_work_mid_step_and_drains_on_stop() -> None:
    got = asyncio.run(_run())
    assert sorted(got) == [f"r{i}" for i in range(8)]
    assert all(len(toks) == OUT + 1 and toks[-1] == "end" for toks in got.values())
