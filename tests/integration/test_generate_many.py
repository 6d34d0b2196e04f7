"""GenerateMany: many requests over one call, over real gRPC on loopback."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, InvalidArgument
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc


@pytest.fixture
async def model_stack(tiny_model_dir):
    cfg = StackConfig(model=tiny_model_dir,
                      engine_options={"device": "cpu", "num_kv_blocks": 512, "max_running": 16})
    async with LocalStack(cfg) as s:
        yield s


@pytest.fixture
async def fake_stack():
    # 2 ms steps: a 2000-token request runs for seconds
    async with LocalStack(StackConfig(engine="fake", engine_options={"step_delay_s": 0.002})) as s:
        yield s


def target(stack) -> str:
    return f"127.0.0.1:{stack.scheduler.port}"


async def test_many_requests_on_one_call_equal_generate(model_stack):
    rng = random.Random(3)
    asks = [dict(prompt_token_ids=[rng.randrange(256) for _ in range(rng.randint(1, 40))],
                 max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in range(12)]
    async with AsyncDynabatchClient(target(model_stack), timeout=120) as client:
        alone = [await client.generate(**a) for a in asks]
        async with client.many() as many:
            together = await asyncio.gather(*(many.generate(**a) for a in asks))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == ["length"] * len(asks)
    assert all(r.timings.output_tokens == len(r.token_ids) for r in together)


async def test_a_bad_request_fails_alone(fake_stack):
    async with AsyncDynabatchClient(target(fake_stack), timeout=30) as client:
        async with client.many() as many:
            good = [many.generate(prompt_token_ids=[1, 2], max_tokens=4 + i) for i in range(5)]
            bad = many.generate(prompt_token_ids=[], max_tokens=4)
            results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert [len(r.token_ids) for r in results[:5]] == [4, 5, 6, 7, 8]
    assert isinstance(results[5], InvalidArgument) and "prompt" in results[5].details


async def test_raw_call_reports_each_request(fake_stack):
    """Without the SDK: a missing id and a duplicate id get their own RequestError; the call
    ends OK once the client half-closed and every request ended."""
    async with grpc.aio.insecure_channel(target(fake_stack)) as channel:
        call = scheduler_pb2_grpc.SchedulerStub(channel).GenerateMany(timeout=30)
        req = pb.GenerateRequest(request_id="x", prompt_token_ids=[1], max_tokens=50, ignore_eos=True)
        await call.write(pb.GenerateManyRequest(requests=[
            req, pb.GenerateRequest(prompt_token_ids=[1], max_tokens=1), req]))
        await call.done_writing()
        finals, errors = [], []
        async for resp in call:
            finals += [m for m in resp.responses if m.finish_reason]
            errors += list(resp.errors)
        assert await call.code() == grpc.StatusCode.OK
    assert [(m.request_id, m.timings.output_tokens) for m in finals] == [("x", 50)]
    codes = sorted((e.request_id, grpc.StatusCode.INVALID_ARGUMENT.value[0] == e.code,
                    e.ended) for e in errors)
    assert codes == [("", True, True), ("x", False, True)]
    assert [e.code for e in errors if e.request_id == "x"] == [grpc.StatusCode.ALREADY_EXISTS.value[0]]


async def test_leaving_a_stream_or_the_call_cancels_on_the_server(fake_stack):
    async with AsyncDynabatchClient(target(fake_stack), timeout=30) as client:
        async with client.many() as many:
            async for _ in many.stream(prompt_token_ids=[1], max_tokens=2000, ignore_eos=True):
                break
            for _ in range(100):
                if (await client.stats()).cancelled == 1:
                    break
                await asyncio.sleep(0.02)
            assert (await client.stats()).cancelled == 1
        with pytest.raises(RuntimeError):
            async with client.many() as many:
                task = asyncio.ensure_future(many.generate(prompt_token_ids=[1], max_tokens=2000,
                                                           ignore_eos=True))
                await asyncio.sleep(0.2)
                raise RuntimeError("the caller fails")
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            stats = await client.stats()
            if stats.cancelled == 2 and stats.running == 0:
                break
            await asyncio.sleep(0.02)
        assert (stats.cancelled, stats.running, stats.waiting, stats.completed) == (2, 0, 0, 0)


async def test_undecodable_message_ends_the_call_with_invalid_argument(fake_stack):
    async with grpc.aio.insecure_channel(target(fake_stack)) as channel:
        call = channel.stream_stream("/dynabatch.v1.Scheduler/GenerateMany",
                                     request_serializer=bytes, response_deserializer=bytes)(timeout=30)
        await call.write(b"\x0a\x05\x0a\x03\xff\xfe\xfd")     # requests[0].request_id: bad UTF-8
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
