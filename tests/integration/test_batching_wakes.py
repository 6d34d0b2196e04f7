"""When the batching loop ticks (scheduler_svc/batching.py): an ended request wakes it only if
one is waiting for the slot, and a periodic tick leaves no spacing before the next arrival's."""
from __future__ import annotations

import asyncio
import time

from dynabatch.scheduler_svc.batching import BatchingLoop
from dynabatch.scheduler_svc.policy import Waiting
from dynabatch.scheduler_svc.policy.policies import make_policy
from dynabatch.scheduler_svc.requests import RequestTable
from dynabatch.wire.memory_queue import MemoryQueue


def _loop(**kw) -> BatchingLoop:
    policy = make_policy("fcfs")
    return BatchingLoop(MemoryQueue(), policy, RequestTable(), "s1", **kw)


async def test_an_ended_request_wakes_the_loop_only_when_one_waits() -> None:
    loop = _loop()
    loop.slot_freed()
    assert not loop.wake.is_set()
    loop.last_waiting.append(Waiting(request_id="w", prompt_tokens=4, max_tokens=4, arrival_s=0.0))
    loop.slot_freed()
    assert loop.wake.is_set()


async def test_an_arrival_after_a_periodic_tick_is_not_spaced() -> None:
    """Ticks every 50 ms with 1 s of spacing: a wake right after a periodic tick is served at
    once (with the spacing applied to timer ticks too it would wait ~1 s)."""
    loop = _loop(tick_s=0.05, min_tick_s=1.0)
    ticks: list[float] = []

    async def tick(now: float) -> None:
        ticks.append(time.monotonic())
    loop.tick = tick
    stop = asyncio.Event()
    runner = asyncio.ensure_future(loop.run(stop))
    while not ticks:
        await asyncio.sleep(0.005)
    woke = time.monotonic()
    loop.wake.set()
    while len(ticks) < 2:
        await asyncio.sleep(0.005)
    assert ticks[1] - woke < 0.5
    stop.set()
    loop.wake.set()
    await asyncio.wait_for(runner, 3.0)
