"""The worker loop's publish rules, on a recording queue: steps faster than publish_interval_s
share one write, except that a first token or a finish goes out at the next I/O."""
from __future__ import annotations

import asyncio

from dynabatch.worker_svc.engine.api import TokenOutput
from dynabatch.worker_svc.engine_client import EngineProcess
from dynabatch.worker_svc.engine_proc import EngineSpec
from dynabatch.worker_svc.config import WorkerConfig
from dynabatch.worker_svc.loop import WorkerLoop


class RecordingQueue:
    def __init__(self) -> None:
        self.published: list[dict] = []

    async def publish(self, batches: dict) -> None:
        self.published.append(batches)

    async def ack(self, worker_id: str, ids: list[str]) -> None:
        pass

    async def pull(self, worker_id: str, max_items: int, timeout_s: float) -> list:
        return []

    async def read_control(self, worker_id: str) -> list:
        return []


def _loop() -> tuple[WorkerLoop, RecordingQueue]:
    q = RecordingQueue()
    engine = EngineProcess(EngineSpec("fake", "m"))   # never started: publishing needs none
    loop = WorkerLoop(q, engine, WorkerConfig("w", "m", publish_interval_s=3600))
    loop.queue = q             # untraced: the recording queue itself
    loop.owner.update({"a": ("s1", 0), "b": ("s2", 1)})
    loop._live.update({1: "a", 2: "b"})   # both still running in the engine
    loop._last_publish = 1e18  # a publish "just happened": nothing is due by time
    return loop, q


def test_mid_stream_tokens_wait_for_the_interval() -> None:
    loop, q = _loop()
    loop._merge([TokenOutput("a", [5], 3, None)])
    asyncio.run(loop._flush())
    assert q.published == [] and loop._pending


def test_first_token_and_finish_are_published_at_once() -> None:
    for out in (TokenOutput("b", [5], 0, None), TokenOutput("b", [9], 7, "length")):
        loop, q = _loop()
        loop._merge([TokenOutput("a", [1], 4, None), out])
        asyncio.run(loop._flush())
        assert len(q.published) == 1 and not loop._pending and not loop._urgent
        sent = {d.request_id: d for b in q.published[0].values() for d in b.deltas}
        assert sent[out.request_id].offset == out.offset
        assert list(sent[out.request_id].token_ids) == out.token_ids


def test_deltas_carry_owner_attempt_and_worker() -> None:
    loop, q = _loop()
    loop._merge([TokenOutput("a", [1, 2], 0, None), TokenOutput("b", [3], 4, "stop")])
    asyncio.run(loop._publish())
    by_sched = q.published[0]
    assert set(by_sched) == {"s1", "s2"}
    (a,), (b,) = by_sched["s1"].deltas, by_sched["s2"].deltas
    assert (a.request_id, list(a.token_ids), a.offset, a.attempt, a.worker_id) == ("a", [1, 2], 0, 0, "w")
    assert (b.attempt, b.finish_reason != 0) == (1, True)
    assert "b" not in loop.owner      # finished: no longer owned
