"""The step prefill cap end to end: the dynamic policy's cap (policy/prefill_cap.py) travels
scheduler -> queue -> worker -> engine process, and the worker's feedback reports it in force."""
from __future__ import annotations

import asyncio

import pytest

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient
from dynabatch.scheduler_svc.policy import PolicyConfig

ENGINE_MAX = 8192      # the engine's configured prefill_token_budget (build_engine's default)


async def _cap_after_load(model_dir: str, policy: str) -> int:
    cfg = StackConfig(model=model_dir, policy=policy,
                      policy_config=PolicyConfig(tpot_target_s=0.015),
                      engine_options={"device": "cpu", "num_kv_blocks": 512, "max_running": 16,
                                      "mixed_steps": True})
    async with LocalStack(cfg) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=120) as client:
            # A 300-token prompt gives the worker a prefill rate (steps of >= 256 prompt tokens).
            await client.generate(prompt_token_ids=[1] * 300, max_tokens=4, ignore_eos=True)
            cap = ENGINE_MAX
            for i in range(40):          # bounded: each arrival is a decision with fresh feedback
                await client.generate(prompt_token_ids=[2 + i] * 8, max_tokens=4, ignore_eos=True)
                await asyncio.sleep(0.1)
                fbs = await stack.queue.workers()
                cap = fbs[0].step_prefill_tokens
                if cap != ENGINE_MAX:
                    break
            return cap


@pytest.mark.parametrize("policy, capped", [("dynamic", True), ("fcfs", False)])
async def test_the_cap_reaches_the_engine(tiny_model_dir, policy, capped):
    cap = await _cap_after_load(tiny_model_dir, policy)
    if capped:
        assert 64 <= cap < ENGINE_MAX
    else:
        assert cap == ENGINE_MAX
