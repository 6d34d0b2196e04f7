"""How a request's output reaches its client streams (scheduler_svc/requests.py Tracked.follow):
tokens coalesce within the flush window, but the end of a request is never held back by it; the
relay forgets every request a read ended in one queue write."""
from __future__ import annotations

import asyncio
import time

import grpc

from dynabatch.scheduler_svc.requests import Failure, RequestTable
from dynabatch.v1.scheduler_pb2 import FinishReason
from dynabatch.v1.worker_pb2 import TokenDelta, WorkItem

WINDOW = 2.0     # a flush window far longer than the test: only an early wake ends it in time


def _tracked():
    table = RequestTable()
    return table.add(WorkItem(request_id="r1", prompt_token_ids=[1, 2], max_tokens=8))


async def _collect(tracked, out: list) -> None:
    async for msg in tracked.follow(0, None, WINDOW):
        out.append((time.monotonic(), msg))


async def test_the_last_message_is_not_held_back_by_the_flush_window() -> None:
    tracked = _tracked()
    got: list = []
    reader = asyncio.ensure_future(_collect(tracked, got))
    await asyncio.sleep(0)
    tracked.add(0, [5], time.monotonic())         # first message: sent at once
    await asyncio.sleep(0.05)
    tracked.add(1, [6, 7], time.monotonic())       # within the window: coalesced, waits
    await asyncio.sleep(0.05)
    assert len(got) == 1
    ended = time.monotonic()
    tracked.accept(TokenDelta(request_id="r1", offset=3, token_ids=[8],
                              finish_reason=FinishReason.FINISH_REASON_LENGTH), ended)
    await asyncio.wait_for(reader, 1.0)            # well inside the 2-s window
    assert [list(m.token_ids) for _, m in got] == [[5], [6, 7, 8]]
    assert got[-1][1].finish_reason == FinishReason.FINISH_REASON_LENGTH
    assert got[-1][0] - ended < 0.5
    assert not tracked._pauses


async def test_a_failure_ends_a_pausing_stream_at_once() -> None:
    tracked = _tracked()
    got: list = []
    reader = asyncio.ensure_future(_collect(tracked, got))
    await asyncio.sleep(0)
    tracked.add(0, [5], time.monotonic())
    await asyncio.sleep(0.02)
    tracked.fail(Failure(grpc.StatusCode.UNAVAILABLE, "gone"))
    await asyncio.wait_for(reader, 1.0)
    assert isinstance(got[-1][1], Failure) and got[-1][1].code is grpc.StatusCode.UNAVAILABLE


async def test_tokens_within_the_window_are_coalesced() -> None:
    """The window still does its job: tokens that come while a stream pauses go out together
    when the pause ends, not one message each."""
    tracked = _tracked()
    got: list = []

    async def collect() -> None:
        async for msg in tracked.follow(0, None, 0.2):
            got.append(list(msg.token_ids))
    reader = asyncio.ensure_future(collect())
    await asyncio.sleep(0)
    for i in range(6):
        tracked.add(i, [10 + i], time.monotonic())
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    tracked.accept(TokenDelta(request_id="r1", offset=6, token_ids=[16],
                              finish_reason=FinishReason.FINISH_REASON_LENGTH), time.monotonic())
    await asyncio.wait_for(reader, 1.0)
    assert got[0] == [10] and got[1] == [11, 12, 13, 14, 15] and got[-1] == [16]


async def test_the_relay_forgets_every_request_a_read_ended_in_one_queue_write() -> None:
    """A step that ends many requests: each client gets its last message, and the queue forgets
    them all in one call (not a round trip per request before the next delta is relayed)."""
    from dynabatch.scheduler_svc.batching import BatchingLoop
    from dynabatch.scheduler_svc.policy.policies import make_policy
    from dynabatch.scheduler_svc.relay import Relay
    from dynabatch.v1.worker_pb2 import TokenDeltaBatch
    from dynabatch.wire.memory_queue import MemoryQueue

    class Counting(MemoryQueue):
        finishes: list[tuple[str, ...]] = []

        async def finish(self, *request_ids: str) -> None:
            self.finishes.append(request_ids)
            await super().finish(*request_ids)

    queue, table, policy = Counting(), RequestTable(), make_policy("fcfs")
    relay = Relay(queue, "s1", table, policy, BatchingLoop(queue, policy, table, "s1"))
    ids = [f"r{i}" for i in range(20)]
    tracked = [table.add(WorkItem(request_id=i, prompt_token_ids=[1], max_tokens=2)) for i in ids]
    await queue.publish({"s1": TokenDeltaBatch(deltas=[
        TokenDelta(request_id=i, offset=0, token_ids=[3, 4],
                   finish_reason=FinishReason.FINISH_REASON_LENGTH) for i in ids])})
    stop = asyncio.Event()
    runner = asyncio.ensure_future(relay.run(stop))
    for _ in range(100):
        if queue.finishes:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(runner, 2.0)
    assert queue.finishes == [tuple(ids)]
    assert all(t.finish_reason == FinishReason.FINISH_REASON_LENGTH and t.output == [3, 4]
               for t in tracked)
    assert not table.by_id and table.counts["completed"] == 20
