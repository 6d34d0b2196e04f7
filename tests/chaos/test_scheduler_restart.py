"""Scheduler restarts (SIGKILL, then SIGTERM with a drain) under load: no request is lost.

The scheduler runs as a real process with a stable --scheduler-id; clients ride through the
restarts with the SDK's automatic Resume.
"""
from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynabatch.client import AsyncDynabatchClient, Unavailable

from .conftest import MODEL, Ledger, free_port, wait_for

SID = "sched-chaos"
# The default 2 s TTFT target would let admission control turn away the last of the second
# wave (6 requests of 3 s each on 4 slots) once the restarted scheduler has measured the
# service rate: right for serving, but not what this test is about (losing nothing).
LENIENT = ("--policy-opt", "ttft_target_s=600")


def start_scheduler(procs, redis_url: str, prefix: str, port: int):
    return procs.start("scheduler", "scheduler", "--redis-url", redis_url, "--redis-prefix", prefix,
                       "--listen", f"127.0.0.1:{port}", "--model", MODEL, "--scheduler-id", SID,
                       "--drain-grace-s", "1.5", *LENIENT)


async def health(target: str) -> int | None:
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5)
            return resp.status
    except grpc.aio.AioRpcError:
        return None


async def test_scheduler_sigkill_and_sigterm_lose_nothing(procs, redis_url, prefix):
    port = free_port()
    target = f"127.0.0.1:{port}"
    procs.worker(redis_url, prefix, "--fake-step-delay-ms", "20", "--max-running", "4")
    sched = start_scheduler(procs, redis_url, prefix, port)
    SERVING = health_pb2.HealthCheckResponse.SERVING
    await wait_for(lambda: _is(target, SERVING), 60, "scheduler serving")
    ledger = Ledger()
    async with AsyncDynabatchClient(target, timeout=90, resume_retries=100) as client:
        # SIGKILL with 4 requests running and 8 queued.
        first = [asyncio.create_task(ledger.run(client, f"k-{i}", [5] * (1 + i), 60))
                 for i in range(12)]
        await wait_for(lambda: ledger.flowing(2), 30, "tokens flowing")
        sched.signal(signal.SIGKILL)
        sched.popen.wait(5)
        sched = start_scheduler(procs, redis_url, prefix, port)
        await asyncio.wait_for(asyncio.gather(*first), 90)
        assert ledger.completed == 12

        # SIGTERM: NOT_SERVING and no admissions while draining; what did not finish within the
        # grace period is handed back and completes on the next instance.
        second = [asyncio.create_task(ledger.run(client, f"t-{i}", [9] * (1 + i), 150))
                  for i in range(6)]
        await wait_for(lambda: ledger.flowing(14), 30, "tokens flowing again")
        sched.signal(signal.SIGTERM)
        await wait_for(lambda: _is(target, health_pb2.HealthCheckResponse.NOT_SERVING), 2,
                       "NOT_SERVING while draining", every_s=0.01)
        async with AsyncDynabatchClient(target, timeout=5, resume_retries=0) as direct:
            with pytest.raises(Unavailable):
                await direct.generate(prompt_token_ids=[1], max_tokens=2)
        assert sched.popen.wait(10) == 0                    # drained and exited on its own
        sched = start_scheduler(procs, redis_url, prefix, port)
        await asyncio.wait_for(asyncio.gather(*second), 90)
    ledger.check()
    assert ledger.completed == 18 and not ledger.failed
    assert "handing back" in procs.started[-2].output()


async def _is(target: str, status: int) -> bool:
    return await health(target) == status
