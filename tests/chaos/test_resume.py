"""Resume: re-attaching to a request by id from an offset (in-process, fast)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, DynabatchClient
from dynabatch.scheduler_svc.requests import Failure
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc

from .conftest import MODEL, expected_tokens, wait_for

BROKEN = Failure(grpc.StatusCode.UNAVAILABLE, "stream broken by the test")


@pytest.fixture
async def stack():
    cfg = StackConfig(model=MODEL, engine="fake", engine_options={"step_delay_s": 0.005})
    async with LocalStack(cfg) as s:
        yield s


async def _break_streams_after(stack, rid: str, tokens: int, times: int) -> None:
    table = stack.scheduler.table
    for _ in range(times):
        start = len(table.by_id[rid].output) if rid in table.by_id else 0
        await wait_for(lambda: rid in table.by_id and len(table.by_id[rid].output) >= start + tokens,
                       10, "tokens")
        table.by_id[rid].detach(BROKEN)


async def test_sdk_resumes_broken_streams_async_and_sync(stack):
    async with AsyncDynabatchClient(stack.target, timeout=30) as client:
        breaker = asyncio.create_task(_break_streams_after(stack, "a-1", 10, 3))
        result = await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=120,
                                       ignore_eos=True, request_id="a-1")
        await breaker
    assert result.token_ids == expected_tokens(3, 120)      # contiguous, no duplicate

    def sync_run():
        with DynabatchClient(stack.target, timeout=30) as c:
            return c.generate(prompt_token_ids=[4] * 5, max_tokens=120, ignore_eos=True,
                              request_id="s-1")
    breaker = asyncio.create_task(_break_streams_after(stack, "s-1", 10, 2))
    result = await asyncio.to_thread(sync_run)
    await breaker
    assert result.token_ids == expected_tokens(5, 120)


async def test_resume_rpc_offsets_and_errors(stack):
    async with AsyncDynabatchClient(stack.target, timeout=30) as client:
        done = await client.generate(prompt_token_ids=[7, 7], max_tokens=30, ignore_eos=True,
                                     request_id="r-1")
        stub = scheduler_pb2_grpc.SchedulerStub(client.channel)
        tail = [m async for m in stub.Resume(pb.ResumeRequest(request_id="r-1", offset=25))]
        assert tail[0].offset == 25 and [t for m in tail for t in m.token_ids] == done.token_ids[25:]
        assert tail[-1].finish_reason == pb.FINISH_REASON_LENGTH
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [m async for m in stub.Resume(pb.ResumeRequest(request_id="r-1", offset=31))]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [m async for m in stub.Resume(pb.ResumeRequest(request_id="nobody"))]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
