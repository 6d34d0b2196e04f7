"""/metrics of the scheduler and a worker, scraped over HTTP and parsed by prometheus_client's
text parser, as requests flow through a stack on Redis."""
from __future__ import annotations

import asyncio

import pytest

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.client import AsyncDynabatchClient, InvalidArgument
from dynabatch.wire.models import DEFAULT_MODEL

pytestmark = pytest.mark.redis
MODEL = f'gen_ai_request_model="{DEFAULT_MODEL}"'


async def test_counters_move_as_requests_flow(redis_url, scrape):
    cfg = StackConfig(engine="fake", redis_url=redis_url, metrics_port=0,
                      engine_options={"max_running": 64, "num_kv_blocks": 5000})
    async with LocalStack(cfg) as stack:
        sched_port = stack.scheduler.metrics_server.port
        before = await asyncio.to_thread(scrape, sched_port)
        assert before["dynabatch_admissions_total"] == 0
        assert "dynabatch_sla_attainment" not in before      # nothing measured yet: no sample
        lengths = [5, 17, 40, 9, 23, 31, 1, 12]
        async with AsyncDynabatchClient(stack.target, timeout=30) as c:
            results = await asyncio.gather(*(
                c.generate(prompt_token_ids=[1] * (i + 1), max_tokens=n, ignore_eos=True)
                for i, n in enumerate(lengths)))
            with pytest.raises(InvalidArgument):
                await c.generate(prompt_token_ids=[1], max_tokens=0)
        assert [len(r.token_ids) for r in results] == lengths
        await asyncio.sleep(0.6)            # gauges re-sample every 0.5 s; heartbeats 0.25 s
        s = await asyncio.to_thread(scrape, sched_port)
        w = await asyncio.to_thread(scrape, stack.loops[0].metrics_server.port)

    n, total = len(lengths), sum(lengths)
    assert s["dynabatch_admissions_total"] == n
    assert s['dynabatch_rejections_total{reason="invalid_argument"}'] == 1
    assert s['dynabatch_requests_finished_total{outcome="completed"}'] == n
    assert s["dynabatch_output_tokens_total"] == total
    assert s["dynabatch_input_tokens_total"] == sum(range(1, n + 1))
    assert s[f"gen_ai_server_time_to_first_token_seconds_count{{{MODEL}}}"] == n
    # TPOT needs two tokens: the 1-token request has none
    assert s[f"gen_ai_server_time_per_output_token_seconds_count{{{MODEL}}}"] == n - 1
    assert s[f'gen_ai_server_request_duration_seconds_count{{error_type="",{MODEL}}}'] == n
    assert s[f"gen_ai_server_time_to_first_token_seconds_sum{{{MODEL}}}"] > 0
    assert s["dynabatch_sla_evaluated_total"] == n
    assert 0 <= s["dynabatch_sla_met_total"] <= n
    assert s["dynabatch_sla_attainment"] == s["dynabatch_sla_met_total"] / n
    worker_id = stack.loops[0].cfg.worker_id
    assert s[f'dynabatch_b_target{{worker="{worker_id}"}}'] > 0
    assert s[f'dynabatch_running{{worker="{worker_id}"}}'] == 0

    assert w["dynabatch_worker_output_tokens_total"] == total
    # steps run; the fake engine does not tell prefill from decode steps
    assert w['dynabatch_worker_step_duration_seconds_count{kind="step"}'] >= max(lengths)
    assert w["dynabatch_worker_batch_size_sum"] == total      # requests that got a token, summed
    assert w["dynabatch_kv_blocks_total"] == 5000
    assert w["dynabatch_kv_blocks_used"] == 0 and w["dynabatch_worker_running"] == 0


async def test_queue_depth_per_bin_while_requests_wait(redis_url, scrape):
    """With no worker the requests wait: the gauge counts them (in bin 0 of the fcfs policy)."""
    cfg = StackConfig(engine="fake", redis_url=redis_url, metrics_port=0, workers=0)
    async with LocalStack(cfg) as stack:
        async with AsyncDynabatchClient(stack.target, timeout=30) as c:
            tasks = [asyncio.create_task(c.generate(prompt_token_ids=[1, 2], max_tokens=3))
                     for _ in range(5)]
            await asyncio.sleep(0.8)
            s = await asyncio.to_thread(scrape, stack.scheduler.metrics_server.port)
            assert s['dynabatch_queue_depth{bin="0"}'] == 5
            await stack.add_worker()
            await asyncio.gather(*tasks)
            await asyncio.sleep(0.6)
            s = await asyncio.to_thread(scrape, stack.scheduler.metrics_server.port)
            assert s['dynabatch_queue_depth{bin="0"}'] == 0
            assert s['dynabatch_requests_finished_total{outcome="completed"}'] == 5


def test_the_step_prefill_cap_is_a_gauge_per_worker() -> None:
    """The policy's cap per worker (policy/prefill_cap.py) as dynabatch_step_prefill_tokens; a
    worker that leaves takes its sample with it."""
    from dynabatch.scheduler_svc.metrics import SchedulerMetrics
    from dynabatch.scheduler_svc.policy import Decision

    m = SchedulerMetrics()
    m.decided(Decision(step_prefill_tokens={"w1": 200}))
    sample = lambda: m.registry.get_sample_value("dynabatch_step_prefill_tokens",  # noqa: E731
                                                 {"worker": "w1"})
    assert sample() == 200
    m._workers = {"w1"}                 # w1 was live at the last refresh, and is gone now
    m.refresh(1.0, {}, [], {})
    assert sample() is None
