"""Worker crashes: SIGKILL mid-batch, poison requests, no worker left."""
from __future__ import annotations

import asyncio
import signal

from dynabatch.client import AsyncDynabatchClient

from .conftest import Ledger, live_workers, running_on, wait_for

CRASH_TOKEN = 255


async def test_sigkilled_worker_requests_resume_on_another(redis_stack, procs, redis_url, prefix):
    workers = {p.name: p for p in (procs.worker(redis_url, prefix, "--fake-step-delay-ms", "20")
                                   for _ in range(2))}
    await wait_for(lambda: live_workers(redis_stack) == set(workers), 30, "two workers")
    ledger = Ledger()
    async with AsyncDynabatchClient(redis_stack.target, timeout=60) as client:
        tasks = [asyncio.create_task(ledger.run(client, f"crash-{i}", [1 + i] * (3 + i), 80))
                 for i in range(16)]
        table = redis_stack.scheduler.table.by_id
        await wait_for(lambda: len(running_on(redis_stack)) == 2
                       and all(len(t.output) >= 5 for t in table.values()), 20, "tokens flowing")
        victim_id, in_flight = running_on(redis_stack).most_common(1)[0]
        workers[victim_id].signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    ledger.check()
    assert ledger.completed == 16                      # each one continuous and exact
    assert redis_stack.scheduler.recovery.reclaimed >= in_flight
    assert [w for w, p in workers.items() if p.alive()] == [w for w in workers if w != victim_id]


async def test_poison_request_fails_internal_then_no_worker_left(redis_stack, procs, redis_url,
                                                                 prefix):
    workers = [procs.worker(redis_url, prefix, "--fake-step-delay-ms", "10",
                            "--fake-crash-token", str(CRASH_TOKEN)) for _ in range(3)]
    await wait_for(lambda: len(live_workers(redis_stack)) == 3, 30, "three workers")
    ledger = Ledger()
    async with AsyncDynabatchClient(redis_stack.target, timeout=60) as client:
        normal = [asyncio.create_task(ledger.run(client, f"ok-{i}", [7] * (2 + i), 60))
                  for i in range(8)]
        await asyncio.sleep(0.1)
        poison = Ledger()
        await poison.run(client, "poison", [1, CRASH_TOKEN, 2], 20)
        await asyncio.wait_for(asyncio.gather(*normal), 60)
        assert poison.failed == {"INTERNAL": 1}
        # A bystander that ran next to the poison on both crashed workers is indistinguishable
        # from it (and fails the same way); the rest resumed elsewhere and completed exactly.
        assert set(ledger.failed) <= {"INTERNAL"} and ledger.completed >= 2
        assert sum(not w.alive() for w in workers) == 2
        assert all(w.popen.returncode in (70, None) for w in workers)

        # The last worker dies too: a request in flight then ends with DEADLINE_EXCEEDED once
        # its (renewed) queue TTL passes, not hanging.
        last = next(w for w in workers if w.alive())
        orphan = asyncio.create_task(ledger.run(client, "orphan", [3, 3], 500, max_queue_ms=1500))
        await wait_for(lambda: running_on(redis_stack), 10, "orphan running")
        last.signal(signal.SIGKILL)
        await asyncio.wait_for(orphan, 15)
    ledger.check()
    assert ledger.failed["DEADLINE_EXCEEDED"] == 1
    assert redis_stack.scheduler.table.by_id == {}
