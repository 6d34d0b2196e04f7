"""sim_plan: a planned live grid through the simulator, with live_capacity's stopping rule."""
from __future__ import annotations

import json
from datetime import datetime, timedelta

from dynabatch.bench import sim_plan
from dynabatch.bench.latency_model import load_model
from dynabatch.bench.live_capacity import parse_point
from dynabatch.bench.traces import poisson


def _run(tpot_ms: float) -> dict:
    return {"seconds_per_point": 20.0, "mixed_steps": True, "goal": 0.99,
            "sla": {"ttft_ms": 2000, "tpot_ms": tpot_ms}, "step_prefill_tokens": None}


def test_a_label_stops_after_its_first_miss_and_its_capacity_is_the_rate_below() -> None:
    trace = poisson(5.0, 2000, seed=3)
    model = load_model("h200-llama8b-kv8g").with_kv(4096)
    rows = sim_plan.sweep([parse_point("fcfs@2,10,20,40")], _run(50.0), trace, model)
    assert [r["rps"] for r in rows] == [2, 10, 20]          # 40 is not simulated
    assert rows[-1]["sla_attainment"] < 0.99 <= rows[0]["sla_attainment"]
    assert sim_plan.capacities(rows, 0.99) == {"fcfs": 10}


def test_each_step_budget_is_its_own_label(tmp_path) -> None:
    t0 = datetime(2023, 11, 16, 18, 0, 0)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{t0 + timedelta(seconds=0.5 * i)},{300 + 37 * (i % 9)},{20 + 11 * (i % 7)}"
              for i in range(200)]
    csv = tmp_path / "trace.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "plan.json"
    assert sim_plan.main(["--trace", str(csv), "--model", "h200-llama8b-kv8g", "--mixed-steps",
                          "--point", "fcfs@1,2", "--point", "dynamic@1",
                          "--step-prefill-tokens", "128,8192", "--seconds", "30",
                          "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["capacity_rps"]) == {f"{p} step_prefill_tokens={b}" for p in ("fcfs", "dynamic")
                                         for b in (128, 8192)}
    assert {r["step_prefill_tokens"] for r in data["points"]} == {128, 8192}
    assert data["what"].endswith("(not measured)")
