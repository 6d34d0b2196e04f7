"""Bad input: fuzzed gRPC requests (hypothesis, raw bytes on the wire) and garbage in Redis."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1.worker_pb2 import WorkItem

from .conftest import MODEL, purge, wait_for

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
I32 = st.integers(-(2 ** 31), 2 ** 31 - 1)
U32 = st.integers(0, 2 ** 32 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
CODES: Counter = Counter()       # status codes the fuzzer reached (checked below)


@pytest.fixture
async def stack():
    cfg = StackConfig(model=MODEL, engine="fake", engine_options={"max_running": 64})
    async with LocalStack(cfg) as s:
        yield s


def sane_or(valid, wild):
    """Mostly a valid value (so that requests get through), sometimes anything at all."""
    return st.integers(0, 9).flatmap(lambda k: wild if k == 0 else valid)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        request_id=draw(sane_or(st.just(""), st.text(max_size=140))),
        model=draw(sane_or(st.sampled_from(["", MODEL]), st.sampled_from(["nope", "../x", "é"]))),
        max_tokens=draw(sane_or(st.integers(1, 48), I32)),
        stop_token_ids=draw(sane_or(st.just([]), st.lists(I32, max_size=80))),
        ignore_eos=draw(st.booleans()), priority=draw(sane_or(st.integers(0, 3), I32)),
        expected_output_tokens=draw(sane_or(st.just(0), I32)),
        ttft_target_ms=draw(sane_or(st.just(0), U32)), tpot_target_ms=draw(sane_or(st.just(0), U32)),
        max_queue_ms=draw(sane_or(st.just(0), U32)), skip_text=draw(st.booleans()))
    if draw(st.booleans()):
        req.prompt = draw(sane_or(st.text(min_size=1, max_size=300), st.text(max_size=300)))
    if not req.prompt or draw(st.booleans()):
        req.prompt_token_ids.extend(draw(sane_or(st.lists(st.integers(0, 259), min_size=1, max_size=200),
                                                 st.lists(I32, max_size=200))))
    s = req.sampling
    s.temperature = draw(sane_or(st.floats(0, 2, width=32), FLOATS))
    s.top_p = draw(sane_or(st.floats(0, 1, width=32), FLOATS))
    s.top_k = draw(sane_or(st.integers(0, 50), I32))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2 ** 64 - 1))
    return req


def invalid_utf8(req: pb.GenerateRequest) -> bytes:
    """The request with a prompt field (3) whose bytes are not UTF-8."""
    bad = b"\xff\xfe\xc3(" * 3
    return req.SerializeToString() + bytes([0x1A, len(bad)]) + bad


async def call_raw(channel: grpc.aio.Channel, method: str, data: bytes) -> grpc.StatusCode:
    call = channel.unary_stream(f"/dynabatch.v1.Scheduler/{method}")(data, timeout=20)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def assert_clean(stack: LocalStack) -> None:
    """Nothing leaked: no tracked request, nothing waiting or running anywhere."""
    await wait_for(lambda: not stack.scheduler.table.by_id
                   and not any(loop.has_work() or loop.owner for loop in stack.loops),
                   10, "requests table and workers empty")
    assert not await stack.queue.waiting()
    assert all(not t.done() for t in stack.scheduler._tasks)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests(), mangle=st.sampled_from(["none"] * 4 + ["utf8", "truncate", "random"]),
       noise=st.binary(max_size=64))
async def test_fuzzed_generate_ends_ok_invalid_or_exhausted(stack, req, mangle, noise):
    data = req.SerializeToString()
    data = {"none": data, "utf8": invalid_utf8(req), "truncate": data[:max(0, len(data) - 3)],
            "random": noise}[mangle]
    async with grpc.aio.insecure_channel(stack.target) as channel:
        code = await call_raw(channel, "Generate", data)
    assert code in ALLOWED or (code == grpc.StatusCode.DEADLINE_EXCEEDED
                               and 0 < req.max_queue_ms < 1000), code
    CODES[code.name] += 1
    await wait_for(lambda: not stack.scheduler.table.by_id, 5, "request forgotten")


async def test_fuzz_leaves_nothing_behind_and_oversized_is_refused(stack):
    print("fuzz status codes:", dict(CODES))
    if CODES:      # the fuzzer above reached both admitted and refused requests
        assert CODES["OK"] and CODES["INVALID_ARGUMENT"], CODES
    async with grpc.aio.insecure_channel(stack.target, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        for method in ("Generate", "Resume", "Cancel", "GetStats"):
            assert await call_raw(channel, method, b"\xff" * 40) in (
                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK)
        huge = pb.GenerateRequest(prompt="x" * (2 << 20), max_tokens=4)        # > max chars
        assert await call_raw(channel, "Generate", huge.SerializeToString()) == \
            grpc.StatusCode.INVALID_ARGUMENT
        too_big = pb.GenerateRequest(prompt="x" * (9 << 20), max_tokens=4)     # > max message
        assert await call_raw(channel, "Generate", too_big.SerializeToString()) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
    async with AsyncDynabatchClient(stack.target, timeout=20) as client:
        ok = await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=5, ignore_eos=True)
        assert len(ok.token_ids) == 5
    await assert_clean(stack)


async def test_garbage_in_redis_is_quarantined_and_skipped(redis_url, prefix):
    cfg = StackConfig(model=MODEL, engine="fake", redis_url=redis_url, redis_prefix=prefix)
    try:
        await _garbage(LocalStack(cfg), prefix)
    finally:
        await purge(redis_url, prefix)


async def _garbage(stack: LocalStack, prefix: str) -> None:
    async with stack:
        r, p = stack.queue.redis, prefix
        wid, sid = stack.loops[0].cfg.worker_id, stack.scheduler.cfg.scheduler_id
        now_ms = int(time.time() * 1000)
        await wait_for(lambda: stack.scheduler.batching.workers, 10, "worker registered")
        junk = b"\x08\x96\x01garbage\xff\x00"
        await r.hset(f"{p}req:junk1", "item", junk)
        await r.zadd(f"{p}waiting", {"junk1": time.time_ns(), "orphan": time.time_ns()})
        await r.xadd(f"{p}assign:{wid}", {"id": "x", "item": junk})
        await r.xadd(f"{p}assign:{wid}", {"nothing": "here"})
        await r.xadd(f"{p}out:{sid}", {"d": junk})
        await r.xadd(f"{p}out:{sid}", {"x": "y"})
        await r.set(f"{p}worker:ghost", junk)
        await r.zadd(f"{p}workers", {"ghost": now_ms + 60_000, "dead": now_ms - 1})
        await r.xadd(f"{p}assign:dead", {"id": "z", "item": junk})
        await r.rpush(f"{p}ctl:{wid}", junk)
        item = WorkItem(request_id="half", model=MODEL, prompt_token_ids=[1], max_tokens=2,
                        scheduler_id="elsewhere")
        await r.hset(f"{p}req:wrong", "item", item.SerializeToString())  # id mismatch
        await r.zadd(f"{p}waiting", {"wrong": time.time_ns()})

        async with AsyncDynabatchClient(stack.target, timeout=20) as client:
            results = await asyncio.gather(*(
                client.generate(prompt_token_ids=[3] * (i + 1), max_tokens=6, ignore_eos=True)
                for i in range(8)))
        assert all(len(res.token_ids) == 6 for res in results)
        await wait_for(lambda: _quarantined(r, p, 9), 10, "9 values quarantined")
        assert all(not t.done() for t in stack.scheduler._tasks + stack._tasks)
        assert not await r.zrange(f"{p}waiting", 0, -1)


async def _quarantined(r, p, n: int) -> bool:
    return await r.llen(f"{p}quarantine") >= n
