"""Overload: open-loop arrivals at twice the capacity for a bounded time. Admitted requests keep
their SLA (TTFT target); the rest are refused at once with RESOURCE_EXHAUSTED and a retry-after
hint; memory stays bounded."""
from __future__ import annotations

import asyncio
import gc
import resource
import time

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, ResourceExhausted

from .conftest import MODEL, Ledger, expected_tokens

STEP_S, RUNNING, OUT = 0.01, 16, 20
CAPACITY = RUNNING / (OUT * STEP_S)        # requests/s the worker completes at most (80)
TTFT_TARGET_MS = 1000
TPOT_TARGET_MS = 50                        # PolicyConfig's default TPOT target
SECONDS = 4.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


async def _one(client, ledger: Ledger, i: int, ttfts: list, rejected: list) -> None:
    ledger.submitted += 1
    start, got = time.monotonic(), []
    try:
        async for msg in client.stream(prompt_token_ids=[2] * 4, max_tokens=OUT, ignore_eos=True,
                                       skip_text=True, ttft_target_ms=TTFT_TARGET_MS,
                                       request_id=f"o-{i}"):
            got.extend(msg.token_ids)
            final = msg
    except ResourceExhausted as e:
        ledger.failed["RESOURCE_EXHAUSTED"] += 1
        rejected.append((time.monotonic() - start, e.retry_after_s))
        return
    except Exception as e:   # anything else is a failure of the test
        ledger.failed[type(e).__name__] += 1
        return
    assert got == expected_tokens(4, OUT)
    ledger.completed += 1
    ttfts.append(final.timings.ttft_ms)      # the scheduler's: arrival to first token relayed
    assert final.timings.tpot_ms <= TPOT_TARGET_MS


async def test_twice_capacity_sheds_early_and_keeps_sla():
    cfg = StackConfig(model=MODEL, engine="fake", policy="dynamic",
                      engine_options={"max_running": RUNNING, "step_delay_s": STEP_S})
    async with LocalStack(cfg) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30, resume_retries=0) as client:
            # Warm-up at the load's shape: admission needs measured step times and output lengths.
            await asyncio.gather(*(client.generate(prompt_token_ids=[1], max_tokens=OUT,
                                                   ignore_eos=True) for _ in range(RUNNING)))
            gc.collect()
            before = rss_mb()
            ledger, ttfts, rejected, tasks = Ledger(), [], [], []
            rate, start = 2 * CAPACITY, time.monotonic()
            for i in range(int(rate * SECONDS)):      # open loop: arrivals do not wait
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(_one(client, ledger, i, ttfts, rejected)))
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        gc.collect()
        after = rss_mb()
        assert not stack.scheduler.table.by_id
    ledger.check()
    assert set(ledger.failed) <= {"RESOURCE_EXHAUSTED"}, ledger.failed
    admitted = ledger.completed / ledger.submitted
    assert 0.25 < admitted < 0.85, f"admitted {admitted:.0%} at 2x capacity"
    ttfts.sort()
    p99 = ttfts[int(0.99 * (len(ttfts) - 1))]
    assert p99 <= TTFT_TARGET_MS, f"admitted TTFT p99 {p99:.0f} ms > target"
    assert max(t for t, _ in rejected) < 0.5            # refused early, not after waiting
    assert all(r > 0 for _, r in rejected)              # with a retry-after hint
    assert after - before < 64, f"RSS grew {after - before:.0f} MiB"
    print(f"overload: {ledger.submitted} sent, {admitted:.0%} admitted, TTFT p99 {p99:.0f} ms, "
          f"RSS {before:.0f} -> {after:.0f} MiB")
