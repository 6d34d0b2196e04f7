"""sim_vs_live: a "live" run made by the simulator itself must compare at zero error, and the
loop-time fit must recover the loop time it was made with."""
from __future__ import annotations

from dataclasses import replace

import pytest

from dynabatch.bench import sim_vs_live as svl
from dynabatch.bench.latency_model import load_model
from dynabatch.bench.traces import poisson


def _fake_live(trace, model, policies=("fcfs", "dynamic"), rate=20.0) -> dict:
    live = {"seconds_per_point": 4.0, "goal": 0.99, "sla": {"ttft_ms": 2000, "tpot_ms": 50},
            "points": [], "capacity_rps": {}}
    for pol in policies:
        p = {"label": pol, "policy": pol, "opts": [], "target_rps": rate}
        p.update(svl.simulate_point(p, live, trace, model))
        live["points"].append(p)
    return live


def test_self_comparison_is_exact_and_fit_recovers_loop_ms() -> None:
    trace = poisson(5.0, 400, seed=2)
    base = replace(load_model("h200-llama8b-kv8g"), alternate_prefill=True)
    live = _fake_live(trace, replace(base, loop_ms=3.0))
    rows = svl.compare(live, trace, replace(base, loop_ms=3.0))
    assert all(r[k]["rel_err"] in (0, None) for r in rows for k in svl.METRICS)
    best, loss = svl.fit_loop_ms(live, trace, base, [0.0, 1.5, 3.0, 6.0])
    assert best == 3.0 and loss[3.0] == pytest.approx(0.0)
    assert loss[0.0] > 0 and loss[6.0] > 0


def test_a_mixed_steps_run_is_simulated_with_mixed_steps() -> None:
    """live_capacity --mixed-steps records it; the simulated points must run the same engine
    (decodes in prefill steps), or the alternating model's stalls would be compared instead."""
    trace = poisson(5.0, 300, seed=4)
    base = replace(load_model("h200-llama8b-kv8g"), alternate_prefill=True)
    point = {"label": "fcfs", "policy": "fcfs", "opts": [], "target_rps": 5.0}
    live = {"seconds_per_point": 20.0, "sla": {"ttft_ms": 2000, "tpot_ms": 50}}
    alternating = svl.simulate_point(point, live, trace, base)
    mixed = svl.simulate_point(point, {**live, "mixed_steps": True}, trace, base)
    assert mixed["tpot_ms"]["p99"] < alternating["tpot_ms"]["p99"]


def test_a_fixed_step_budget_is_simulated_with_that_budget() -> None:
    """live_capacity --step-prefill-tokens records the worker's budget: a long prompt arriving
    alone then prefills in chunks of it, so its TTFT grows as the budget shrinks."""
    trace = poisson(0.5, 20, seed=5)
    model = load_model("h200-llama8b-kv8g")
    point = {"label": "fcfs", "policy": "fcfs", "opts": [], "target_rps": 0.5}
    live = {"seconds_per_point": 40.0, "sla": {"ttft_ms": 2000, "tpot_ms": 50}}
    whole = svl.simulate_point(point, live, trace, model)
    chunked = svl.simulate_point(point, {**live, "step_prefill_tokens": 32}, trace, model)
    assert chunked["ttft_ms"]["p50"] > 2 * whole["ttft_ms"]["p50"]
