"""Redis restarts empty (no persistence) under load: requests in flight fail cleanly with
UNAVAILABLE, no process hangs or dies, and service is back within 5 s of Redis returning."""
from __future__ import annotations

import asyncio
import time

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, DynabatchError

from .conftest import MODEL, Ledger, live_workers, wait_for


async def test_redis_restart(private_redis, procs, prefix):
    stack = LocalStack(StackConfig(model=MODEL, engine="fake", workers=0,
                                   redis_url=private_redis.url, redis_prefix=prefix))
    async with stack:
        worker = procs.worker(private_redis.url, prefix, "--fake-step-delay-ms", "20")
        await wait_for(lambda: live_workers(stack) == {worker.name}, 30, "worker up")
        ledger = Ledger()
        async with AsyncDynabatchClient(stack.target, timeout=30) as client:
            in_flight = [asyncio.create_task(ledger.run(client, f"r-{i}", [4] * (1 + i), 400))
                         for i in range(6)]
            await wait_for(lambda: ledger.flowing(6), 20, "tokens flowing")
            private_redis.kill()

            await ledger.run(client, "during-outage", [1, 2], 4)
            assert ledger.failed["UNAVAILABLE"] == 1     # no admission without a queue
            await asyncio.sleep(1.0)
            private_redis.start()
            back = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*in_flight), 15)
            assert ledger.failed["UNAVAILABLE"] == 7, ledger     # the 6 + the one refused

            served_after = await _first_success(client, ledger)
        ledger.check()
        assert served_after - back < 5.0, f"service resumed {served_after - back:.1f} s after Redis"
        assert worker.alive() and "Traceback" not in worker.output()
        assert private_redis.password not in worker.output()     # no secrets in logs
        assert all(not t.done() for t in stack.scheduler._tasks)   # its loops survived
        assert stack.scheduler.table.by_id == {}


async def _first_success(client, ledger: Ledger) -> float:
    for attempt in range(100):
        try:
            await client.generate(prompt_token_ids=[8, 8], max_tokens=3, ignore_eos=True,
                                  timeout=2)
            return time.monotonic()
        except DynabatchError:
            await asyncio.sleep(0.1)
    raise AssertionError("service did not resume")
