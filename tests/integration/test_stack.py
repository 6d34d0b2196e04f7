"""The walking skeleton end to end: SDK -> gRPC -> scheduler -> queue -> worker -> tokens back.

Runs against both queue backends: a real Redis server and the in-process default.
"""
from __future__ import annotations

import asyncio
import contextlib
import random

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, Cancelled, DynabatchClient, InvalidArgument


@pytest.fixture(params=["memory", "redis"])
async def stack(request, tiny_model_dir):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    cfg = StackConfig(model=tiny_model_dir, redis_url=url,
                      engine_options={"device": "cpu", "num_kv_blocks": 512, "max_running": 16})
    async with LocalStack(cfg) as s:
        yield s


def reference_greedy(model_dir: str, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None      # ignore_eos: always exactly max_tokens
    outs = []
    with torch.no_grad():
        for ids, n in zip(prompts, lengths):
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                               do_sample=False, pad_token_id=258)
            outs.append(y[0, len(ids):].tolist())
    return outs


async def test_concurrent_streams_match_model_generate(stack, tiny_model_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 60))] for _ in range(32)]
    lengths = [rng.randint(1, 24) for _ in range(32)]

    async def one(client, ids, n):
        offsets, tokens = [], []
        async for msg in client.stream(prompt_token_ids=ids, max_tokens=n, ignore_eos=True):
            offsets.append((msg.offset, len(msg.token_ids)))
            tokens.extend(msg.token_ids)
            final = msg
        return offsets, tokens, final

    async with AsyncDynabatchClient(stack.target, timeout=120) as client:
        results = await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))
    expected = reference_greedy(tiny_model_dir, prompts, lengths)
    for (offsets, tokens, final), n, want in zip(results, lengths, expected):
        assert len(tokens) == n
        pos = 0
        for off, k in offsets:            # contiguous: no gap, no duplicate
            assert off == pos
            pos += k
        assert final.finish_reason == 2   # FINISH_REASON_LENGTH
        assert final.timings.output_tokens == n
        assert tokens == want             # batching does not change greedy results


async def test_cancel_mid_stream_frees_the_slot(stack):
    async with AsyncDynabatchClient(stack.target, timeout=60) as client:
        others = [asyncio.create_task(client.generate(prompt_token_ids=[1, 2, 3], max_tokens=8,
                                                      ignore_eos=True)) for _ in range(3)]
        seen = 0
        stream = client.stream(prompt_token_ids=[9, 9, 9], max_tokens=1500, ignore_eos=True,
                               request_id="long-one")
        async for msg in stream:
            seen += len(msg.token_ids)
            if seen >= 3:
                break                      # leaving the loop cancels the request
        await stream.aclose()
        done = await asyncio.gather(*others)
        assert all(len(r.token_ids) == 8 for r in done)
        for _ in range(200):               # bounded: the worker frees the slot within ~2 s
            running = sum(len(loop.owner) for loop in stack.loops)
            if running == 0 and not any(loop.has_work() for loop in stack.loops):
                break
            await asyncio.sleep(0.01)
        assert running == 0
        stats = await client.stats()
        assert stats.cancelled == 1 and stats.running == 0
        assert stats.completed >= 3


async def _consume_long(client: AsyncDynabatchClient, request_id: str) -> None:
    """Stream a request long enough (1,500 tokens) to be cancelled or observed while running."""
    async for _ in client.stream(prompt_token_ids=[4, 5], max_tokens=1500, ignore_eos=True,
                                 request_id=request_id):
        pass


async def test_cancel_rpc_ends_the_stream_with_cancelled(stack):
    async with AsyncDynabatchClient(stack.target, timeout=60) as client:
        task = asyncio.create_task(_consume_long(client, "to-cancel"))
        for _ in range(200):
            if await client.cancel("to-cancel"):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(Cancelled):
            await task
        assert not await client.cancel("to-cancel")     # already gone


BAD = [
    (dict(prompt="", max_tokens=4), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=-3), "max_tokens"),
    (dict(prompt="hi", max_tokens=10_000_000), "max_tokens"),
    (dict(prompt="hi", max_tokens=4, temperature=-1.0), "temperature"),
    (dict(prompt="hi", max_tokens=4, top_p=1.5), "top_p"),
    (dict(prompt="hi", max_tokens=4, top_p=-0.1), "top_p"),
    (dict(prompt="hi", max_tokens=4, model="no-such-model"), "model"),
    (dict(prompt_token_ids=[1, 99999], max_tokens=4), "prompt_token_ids"),
    (dict(prompt="hi", max_tokens=4, request_id="bad id!"), "request_id"),
]


async def test_bad_input_is_invalid_argument_and_server_keeps_serving(stack):
    async with AsyncDynabatchClient(stack.target, timeout=30) as client:
        for fields, name in BAD:
            with pytest.raises(InvalidArgument) as err:
                await client.generate(**fields)
            assert name in err.value.details, (fields, err.value.details)
        ok = await client.generate("still serving", max_tokens=3, ignore_eos=True)
        assert len(ok.token_ids) == 3


async def test_sync_client_and_text(stack):
    def run():
        with DynabatchClient(stack.target, timeout=30) as client:
            return client.generate("hello", max_tokens=5, ignore_eos=True)
    result = await asyncio.to_thread(run)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    assert isinstance(result.text, str)


async def test_health_and_reflection(stack):
    async with grpc.aio.insecure_channel(stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dynabatch.v1.Scheduler"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in call for s in r.list_services_response.service]
        assert "dynabatch.v1.Scheduler" in names and "grpc.health.v1.Health" in names


async def test_stats_carry_the_engines_own_counts(stack):
    """GetStats passes through what the engine reports (running in it, waiting in it for KV,
    preempted), which the scheduler's own counts cannot see."""
    async with AsyncDynabatchClient(stack.target, timeout=60) as client:
        task = asyncio.create_task(_consume_long(client, "long-one"))
        seen = None
        for _ in range(300):                     # bounded: feedback arrives within ~1 s
            stats = await client.stats()
            seen = next((w for w in stats.workers if w.engine_running), None)
            if seen:
                break
            await asyncio.sleep(0.01)
        await client.cancel("long-one")
        with contextlib.suppress(Exception):
            await task
        assert seen is not None and seen.engine_running == 1
        assert seen.engine_waiting == 0 and seen.preemptions == 0
