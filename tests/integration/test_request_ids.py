"""Request ids the scheduler assigns (a GenerateRequest without request_id): sent at once as
initial metadata `x-request-id`, the same in every message, 32 hex digits, never repeated."""
from __future__ import annotations

import asyncio
import os
import re

import grpc

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.scheduler_svc.service import _Header
from dynabatch.scheduler_svc.validation import RandomIds
from dynabatch.v1 import scheduler_pb2 as pb
from dynabatch.v1 import scheduler_pb2_grpc


async def test_assigned_id_comes_in_initial_metadata_and_every_message():
    async with LocalStack(StackConfig(engine="fake")) as stack:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            seen = set()
            for _ in range(3):
                call = stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=3,
                                                        ignore_eos=True), timeout=30)
                header = dict(await call.initial_metadata())["x-request-id"]
                ids = {msg.request_id async for msg in call}
                assert ids == {header}
                assert re.fullmatch(r"[0-9a-f]{32}", header)
                seen.add(header)
            assert len(seen) == 3


def test_random_ids_are_distinct_across_batches_and_after_fork():
    ids = RandomIds(batch=4)
    drawn = [ids() for _ in range(10)]         # three draws from the OS
    assert len(set(drawn)) == 10
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                               # the child must not reuse the parent's batch
        os.write(write, ids().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child != ids()


class _SlowMetadataContext:
    """send_initial_metadata as grpc.aio has it: a coroutine suspended on its batch's future."""

    def __init__(self) -> None:
        self.future: asyncio.Future | None = None
        self.sent: tuple | None = None

    async def send_initial_metadata(self, metadata) -> None:
        self.future = asyncio.get_running_loop().create_future()
        await self.future
        self.sent = tuple(metadata)


async def test_header_starts_at_once_and_is_collected_before_the_first_message():
    context = _SlowMetadataContext()
    header = _Header(context, "abc")
    assert context.future is not None and context.sent is None   # started, not awaited
    waiting = asyncio.ensure_future(header.sent())
    await asyncio.sleep(0)
    assert not waiting.done()                    # the batch has not completed yet
    context.future.set_result(None)
    await waiting
    assert context.sent == (("x-request-id", "abc"),)
    await header.sent()                          # once only


async def test_header_of_a_stream_that_ends_first_is_let_go():
    context = _SlowMetadataContext()
    header = _Header(context, "abc")
    header.close()
    context.future.set_exception(RuntimeError("the call is gone"))   # retrieved: no warning
    await asyncio.sleep(0)
    assert context.sent is None
