"""The simulator runs the real policy: determinism, exactness against the latency model,
monotonicity in KV capacity, Little's law, KV accounting."""
from __future__ import annotations

import dataclasses

import pytest

from dynabatch.bench.latency_model import LatencyModel, load_model
from dynabatch.bench.metrics import Outcome, littles_law, summarize
from dynabatch.bench.simulator import SimConfig, simulate
from dynabatch.bench.traces import Trace, TraceRequest, gamma_bursty, poisson

SMALL_8B = load_model("h200-llama8b-kv8g").with_kv(1024)   # ~12 Azure-sized sequences


def test_same_seed_same_result() -> None:
    def run() -> list[tuple]:
        r = simulate(gamma_bursty(8.0, 300, cv=2.0, seed=7), SimConfig(policy="dynamic",
                                                                      model=SMALL_8B))
        return [(x.outcome, x.first_token_s, x.finish_s, x.preemptions) for x in r.records]
    assert run() == run()


@pytest.mark.parametrize("model", ["h200-llama1b", "h200-llama8b-kv8g"])
@pytest.mark.parametrize("prompt,output", [(1000, 200), (37, 1), (2000, 33)])
def test_single_request_reproduces_latency_model(model: str, prompt: int, output: int) -> None:
    m: LatencyModel = load_model(model)
    r = simulate(Trace([TraceRequest(0.0, prompt, output)]), SimConfig(policy="fcfs", model=m))
    rec = r.records[0]
    ttft = m.prefill_ms(prompt) / 1000
    total = ttft + sum(m.decode_ms(1, prompt + g) for g in range(1, output)) / 1000
    assert rec.outcome is Outcome.OK and rec.assigned_s == 0.0
    assert rec.ttft == pytest.approx(ttft, rel=1e-12, abs=1e-12)
    assert rec.finish_s == pytest.approx(total, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("policy", ["fcfs", "dynamic", "multibin"])
def test_doubling_kv_never_lowers_goodput(policy: str) -> None:
    trace = poisson(6.0, 250, seed=11)
    goodput = []
    for blocks in (512, 1024, 2048):
        cfg = SimConfig(policy=policy, model=load_model("h200-llama8b-kv8g").with_kv(blocks))
        goodput.append(summarize(simulate(trace, cfg))["goodput_rps"])
    assert goodput == sorted(goodput), goodput


@pytest.mark.parametrize("policy", ["fcfs", "dynamic", "naive"])
def test_littles_law(policy: str) -> None:
    r = simulate(poisson(5.0, 400, seed=5), SimConfig(policy=policy, model=SMALL_8B))
    measured, predicted = littles_law(r)
    assert measured == pytest.approx(predicted, rel=0.05)


def test_every_request_served_and_kv_within_pool() -> None:
    trace = poisson(20.0, 300, seed=2)
    r = simulate(trace, SimConfig(policy="fcfs", model=SMALL_8B,
                                  policy_overrides={"max_wait_s": 1000.0}, ttft_target_s=1000.0))
    s = summarize(r)
    assert s["counts"]["ok"] + s["counts"]["rejected"] == len(trace)
    assert s["counts"]["ok"] > 0
    assert all(0.0 <= x.kv_used <= 1.0 for x in r.timeline)
    assert s["max_kv_used"] > 0.5            # memory actually binds in this setting
    done = [x for x in r.records if x.outcome is Outcome.OK]
    assert all(x.arrival_s <= x.assigned_s <= x.first_token_s <= x.finish_s for x in done)


def test_preemption_by_recompute_when_kv_runs_out() -> None:
    # fcfs reserves no output KV: long outputs outgrow a tiny pool and must be preempted.
    tiny = dataclasses.replace(SMALL_8B.with_kv(200), max_model_len=3000)
    trace = Trace([TraceRequest(0.01 * i, 500, 600) for i in range(8)])
    r = simulate(trace, SimConfig(policy="fcfs", model=tiny, ttft_target_s=100.0))
    assert r.meta["preemptions"] > 0
    assert all(x.outcome is Outcome.OK for x in r.records)


def test_static_runs_batches_to_completion() -> None:
    trace = Trace([TraceRequest(0.001 * i, 100, 50 + 10 * i) for i in range(16)])
    r = simulate(trace, SimConfig(policy="static", model=load_model("h200-llama1b")))
    starts = sorted({x.assigned_s for x in r.records})
    assert len(starts) == 2                       # two batches of static_batch_size = 8
    first = [x for x in r.records if x.assigned_s == starts[0]]
    assert starts[1] >= max(x.finish_s for x in first)


def test_new_work_joins_at_the_next_step_boundary() -> None:
    """A macro step (several decode steps applied at once) is cut when work arrives: the new
    request is prefilled in the very next step, alongside the running decode."""
    m = load_model("h200-llama1b")
    trace = Trace([TraceRequest(0.0, 100, 1000), TraceRequest(0.5, 100, 5)])
    r = simulate(trace, SimConfig(policy="fcfs", model=m))
    a, b = r.records
    one_step = m.decode_ms(1, 100 + 1000) / 1000      # an upper bound on A's step at 0.5 s
    mixed = m.step_ms(1, 100 + 1000, 100, 100 * 50) / 1000
    assert b.assigned_s == 0.5
    assert 0 < b.ttft <= one_step + mixed + 1e-12
    assert a.outcome is Outcome.OK and b.outcome is Outcome.OK



def test_alternating_engine_prefills_alone_and_stalls_decodes() -> None:
    """With alternate_prefill (this project's engine) a prefill step carries no decodes: a
    running request gains no token during it, and the steps alternate while both kinds wait."""
    from dynabatch.bench.simworker import Seq, SimWorker
    m = dataclasses.replace(load_model("h200-llama1b"), alternate_prefill=True,
                            max_batch_tokens=2048)
    w = SimWorker("w", m)
    a = Seq("a", 0, prompt=64, target=50)
    w.add(a)
    t = w.start(0.0)
    w.finish_plan(t)
    assert a.generated == 1                       # its prefill gave the first token
    w.add(Seq("b", 1, prompt=3000, target=5))     # two chunks at 2048 tokens per step
    kinds = []
    for _ in range(4):
        end = w.start(t)
        prefill = bool(w.plan.chunks)
        kinds.append("prefill" if prefill else "decode")
        before = a.generated
        w.finish_plan(end)
        assert a.generated - before == (0 if prefill else 1)   # one decode step at a time
        t = end
    assert kinds == ["decode", "prefill", "decode", "prefill"]   # a's prefill came last


def test_reported_decode_step_is_the_engines_decode_only_window() -> None:
    """The simulated worker reports its decode step as the engine does (EngineStats): the mean
    of its recent decode-only steps. A mixed step (prefill chunk + decodes) counts as prefill,
    so a long chunk does not inflate the step Algorithm 2 and the step cap are steered by, and
    the window outlives a feedback (a run of mixed steps reports the last decodes measured)."""
    from dynabatch.bench.simworker import Seq, SimWorker
    m = load_model("h200-llama1b")                 # mixed steps (alternate_prefill False)
    w = SimWorker("w", m)
    w.add(Seq("a", 0, prompt=64, target=400))
    t = w.start(0.0)
    w.finish_plan(t)
    while w.decode_steps < 32:                     # decode-only (macro) steps
        end = w.start(t)
        assert not w.plan.chunks
        w.finish_plan(end)
        t = end
    step, batch = w.take_feedback()
    assert batch == 1 and step == pytest.approx(m.step_ms(1, 64 + 33), rel=0.05)
    w.add(Seq("b", 1, prompt=8000, target=5))
    end = w.start(t)
    assert w.plan.chunks and w.plan.batch == 1     # one long mixed step
    assert w.plan.cum_ms[-1] > 5 * step
    w.finish_plan(end)
    assert w.take_feedback() == pytest.approx((step, 1.0), rel=0.05)


@pytest.mark.parametrize("policy, mixed, capped", [("dynamic", True, True),
                                                    ("fcfs", True, False),
                                                    ("dynamic", False, False)])
def test_mixed_steps_take_the_policys_step_prefill_cap(policy: str, mixed: bool,
                                                       capped: bool) -> None:
    """--mixed-steps on a model fitted to the alternating engine: prefill steps carry the
    decodes, and a dynamic policy's step prefill cap (policy/prefill_cap.py) bounds every later
    step's prompt tokens, with the rate the simulated worker measured; fcfs sets none, and an
    alternating worker takes none. The target (7 ms) is tight enough that the decodes' TPOT
    budgets (prefill_cap.slack_tokens) do not allow the whole budget at every step; at 12 ms
    they do."""
    from dynabatch.bench.simulator import Simulation
    m = dataclasses.replace(load_model("h200-llama1b"), alternate_prefill=True)
    trace = Trace([TraceRequest(0.05 * i, 3000 if i % 5 == 0 else 200, 60) for i in range(60)])
    sim = Simulation(trace, SimConfig(policy=policy, model=m, mixed_steps=mixed,
                                      tpot_target_s=0.007))
    assert sim.cfg.model.alternate_prefill is not mixed
    seen: list[int] = []
    worker = sim.workers[0]
    plan = worker._prefill_plan

    def watch(now, decodes):
        p = plan(now, decodes)
        seen.append((worker.prefill_cap, sum(t for _, t in p.chunks)))
        return p
    worker._prefill_plan = watch
    result = sim.run()
    assert all(r.outcome is Outcome.OK for r in result.records)
    if capped:   # the cap binds at times (the decodes' TPOT budgets allow the whole budget at others)
        assert any(0 < cap < m.max_batch_tokens for cap, _ in seen)
        assert all(tokens <= cap for cap, tokens in seen if cap)
    else:
        assert worker.prefill_cap == 0 and max(t for _, t in seen) > 2048 - 60
