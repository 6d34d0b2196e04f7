"""The engine process and its byte format: frames survive any cut of the stream; every request's
tokens come back in order, none lost or repeated; aborts end requests; an engine process that
dies is reported (and takes the worker down with its status); one whose parent dies goes too."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from dynabatch.v1.worker_pb2 import WorkItem
from dynabatch.wire.memory_queue import MemoryQueue
from dynabatch.worker_svc import engine_wire as wire
from dynabatch.worker_svc.engine.api import EngineStats, TokenOutput
from dynabatch.worker_svc.engine_client import EngineDied, EngineProcess
from dynabatch.worker_svc.engine_proc import EngineSpec
from dynabatch.worker_svc.config import WorkerConfig
from dynabatch.worker_svc.loop import WorkerLoop


def _item(rid: str, n: int, prompt: list[int] | None = None) -> WorkItem:
    return WorkItem(request_id=rid, model="m", prompt_token_ids=prompt or [1, 2, 3], max_tokens=n,
                    ignore_eos=True, scheduler_id="s")


def test_frames_survive_any_cut_of_the_stream() -> None:
    stats = EngineStats(running=3, waiting=1, kv_blocks_total=100, kv_blocks_used=7,
                        kv_block_size=16, decode_step_ms=3.5, decode_batch_size=2.0,
                        prefill_tokens_per_s=0.0, max_model_len=2048, max_running=256, steps=42,
                        preemptions=0)
    outs = [TokenOutput("a", [5], 3), TokenOutput("b", [], 0, "abort"),
            TokenOutput("c", [7, 8, 9], 10, "length")]
    stream = (wire.outputs([1, 2, -1], outs, "decode", 123, 0.004, stats, stalled_s=0.002)
              + wire.add(9, b"xyz"))
    for cut in range(1, len(stream)):
        reader = wire.FrameReader()
        frames = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert len(frames) == 2
    rows = wire.rows(frames[0])
    assert (rows.kind, rows.start_ns, rows.seconds, rows.stats) == ("decode", 123, 0.004, stats)
    assert rows.stalled_s == 0.002
    assert list(rows.handles) == [1, 2, -1] and list(rows.offsets) == [3, 0, 10]
    assert list(rows.counts) == [1, 0, 3] and list(rows.tokens) == [5, 7, 8, 9]
    assert [wire.FINISH_NAMES[f] for f in rows.finish] == [None, "abort", "length"]
    assert wire.handle_of(frames[1]) == 9 and frames[1][5:] == b"xyz"


async def _collect(engine: EngineProcess, live: set[int], got: dict[int, list]) -> None:
    """Take rows until no handle in `live` is left; check order as they come."""
    while live:
        await engine.wait(None, 5)
        for f in engine.take():
            if f[:1] == wire.ADD_ERROR:
                got[wire.handle_of(f)].append(("error", wire.add_error_message(f)))
                live.discard(wire.handle_of(f))
                continue
            rows = wire.rows(f)
            pos = 0
            for i, h in enumerate(rows.handles):
                n = rows.counts[i]
                toks = rows.tokens[pos:pos + n].tolist()
                pos += n
                assert rows.offsets[i] == len(got[h]) or rows.finish[i] == 3, "a gap or a repeat"
                got[h] += toks
                if rows.finish[i]:
                    got[h].append(wire.FINISH_NAMES[rows.finish[i]])
                    live.discard(h)


async def _ordering() -> dict[int, list]:
    engine = EngineProcess(EngineSpec("fake", "m", {"max_running": 8}))
    await engine.start()
    try:
        got: dict[int, list] = {h: [] for h in range(1, 41)}
        for h in range(1, 41):                 # more than max_running: some wait, then join
            engine.add(h, _item(f"r{h}", 5 + h))
        engine._send(wire.add(99, b"\xff\xff\xff"))   # bytes that do not decode: refused alone
        got[99] = []
        await _collect(engine, set(got), got)
        return got
    finally:
        await engine.close()


def test_every_token_arrives_once_in_order() -> None:
    got = asyncio.run(_ordering())
    for h in range(1, 41):
        # The fake engine's token i of a 3-token prompt is (3 + i) % 256.
        assert got[h] == [(3 + i) % 256 for i in range(5 + h)] + ["length"]
    assert got[99][0][0] == "error"


async def _abort() -> dict[int, list]:
    engine = EngineProcess(EngineSpec("fake", "m", {"step_delay_s": 0.002}))
    await engine.start()
    try:
        got: dict[int, list] = {1: [], 2: []}
        engine.add(1, _item("a", 10_000))
        engine.add(2, _item("b", 20))
        await asyncio.sleep(0.05)
        engine.abort(1)
        await _collect(engine, {1, 2}, got)
        return got
    finally:
        await engine.close()


def test_abort_ends_a_request_and_spares_the_others() -> None:
    got = asyncio.run(_abort())
    assert got[1][-1] == "abort" and 0 < len(got[1]) - 1 < 10_000
    assert got[2] == [(3 + i) % 256 for i in range(20)] + ["length"]


async def _stall() -> tuple[int, float, float]:
    """A model-free engine outruns a parent that takes nothing for 0.3 s."""
    engine = EngineProcess(EngineSpec("fake", "m", {}))
    await engine.start()
    try:
        engine.add(1, _item("a", 100_000))
        await asyncio.sleep(0.3)
        sent = sum(f[:1] == wire.OUTPUTS for f in engine.take())    # credits go back here
        stalled = gaps = 0.0
        for _ in range(100):
            await engine.wait(None, 1)
            rows = [wire.rows(f) for f in engine.take() if f[:1] == wire.OUTPUTS]
            stalled += sum(r.stalled_s for r in rows)
            gaps += sum(r.gap_s for r in rows)
            if stalled:
                break
        return sent, stalled, gaps
    finally:
        await engine.close()


def test_engine_waits_for_credits_and_says_for_how_long() -> None:
    """It runs at most MAX_AHEAD frames ahead of what the parent took in, then waits; the
    frame after the wait carries its length (the worker's engine_stalled metric), which is part
    of the gap between that step and the one before."""
    sent, stalled, gaps = asyncio.run(_stall())
    assert sent == wire.MAX_AHEAD
    assert 0.1 < stalled < 1.5 and gaps >= stalled


async def _crash() -> tuple[EngineDied, float]:
    q = MemoryQueue()
    engine = EngineProcess(EngineSpec("fake", "m", {"crash_token_id": 99, "step_delay_s": 0.001}))
    loop = WorkerLoop(q, engine, WorkerConfig("w", "m"))
    from dynabatch.v1.worker_pb2 import WorkerFeedback
    await q.heartbeat(WorkerFeedback(worker_id="w", model="m"), ttl_s=30)
    for item in (_item("ok", 1000), _item("poison", 5, [1, 99])):
        await q.submit(item)
    task = asyncio.create_task(loop.run(asyncio.Event()))
    await q.assign("w", [_item("ok", 1000)])
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await q.assign("w", [_item("poison", 5, [1, 99])])
    with pytest.raises(EngineDied) as err:
        await asyncio.wait_for(task, 10)
    return err.value, time.monotonic() - t0


def test_a_dead_engine_process_stops_the_worker_with_its_status() -> None:
    died, after_s = asyncio.run(_crash())
    assert died.status == 70 and died.exit_code == 70
    assert after_s < 5


def test_engine_that_fails_to_build_is_reported() -> None:
    async def start() -> None:
        await EngineProcess(EngineSpec("fake", "m", {"no_such_option": 1})).start()
    with pytest.raises(EngineDied):
        asyncio.run(start())


_ORPHAN = """
import asyncio, sys
from dynabatch.worker_svc.engine_client import EngineProcess
from dynabatch.worker_svc.engine_proc import EngineSpec
async def main():
    e = EngineProcess(EngineSpec("fake", "m"))
    await e.start()
    print(e.proc.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_engine_process_dies_with_a_sigkilled_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        assert _gone(child, 5), "the engine process outlived its worker"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_start_up_heap_is_frozen_once():
    """The worker's processes freeze what start-up allocated (no full-GC pause while serving)."""
    import gc

    from dynabatch.wire import heap
    heap._frozen = False
    try:
        assert heap.freeze_startup_heap() is True
        assert gc.get_freeze_count() > 0
        assert heap.freeze_startup_heap() is False
    finally:
        gc.unfreeze()
