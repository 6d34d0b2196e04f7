"""A live capacity run simulated before it runs: the same points, segments and stopping rule as
bench.live_capacity, each point through the simulator (SIMULATED, not measured).

    python -m dynabatch.bench.sim_plan --trace azure_llm_conv_2023.csv \\
        --model engine_h200_8b.json --mixed-step-times mixed_step_time.json --loop-ms 0.5 \\
        --kv-blocks 1024 --mixed-steps --tpot-ms 11.5 --seconds 90 \\
        --point fcfs@0.6,0.8,1.1 --point 'fcfs:max_num_seqs=8@0.6,0.8' --point dynamic@1.8,2.3 \\
        --step-prefill-tokens 256,8192 --out plan.json

It answers two questions a device call is too short for: where each policy's bound lies on a
live grid (so the call probes rates near it), and which fixed configuration (max_num_seqs, the
worker's step prefill budget) is the best one a sweep would find, to hold the controller to.
Every point replays the first ``rate x --seconds`` requests of the trace at that mean rate
(live_capacity.segment); a label's rates stop after the first below the goal, as live. Each
value of --step-prefill-tokens is a separate worker (its fixed step prefill budget) and
repeats every point. Use a latency model checked against live runs of the same machine
(bench.sim_vs_live) and its fitted --loop-ms.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dynabatch.bench import traces as tr
from dynabatch.bench.latency_model import LatencyModel
from dynabatch.bench.live_capacity import Point, parse_point
from dynabatch.bench.sim_vs_live import simulate_point, worker_model


def sweep(points: list[Point], run: dict, trace: tr.Trace, model: LatencyModel) -> list[dict]:
    """Every point of `run` (a live_capacity JSON's settings, no points yet), simulated."""
    rows = []
    for p in points:
        for rate in p.rates:
            s = simulate_point({"policy": p.policy, "opts": list(p.opts), "target_rps": rate},
                               run, trace, model)
            rows.append({"label": p.label, "step_prefill_tokens": run["step_prefill_tokens"],
                         "rps": rate, "requests": s["requests"],
                         "sla_attainment": s["sla_attainment"], "counts": s["counts"],
                         "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p99_ms": s["tpot_ms"]["p99"],
                         "max_kv_used": s["max_kv_used"]})
            if s["sla_attainment"] < run["goal"]:
                break
    return rows


def capacities(rows: list[dict], goal: float) -> dict[str, float]:
    """Per label and step budget: the highest rate probed at >= goal."""
    out: dict[str, float] = {}
    for r in rows:
        budget = r["step_prefill_tokens"]
        key = r["label"] + (f" step_prefill_tokens={budget}" if budget else "")
        out.setdefault(key, 0.0)
        if r["sla_attainment"] >= goal:   # rows stop after a miss: this one is below it
            out[key] = r["rps"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--model", required=True, help="latency model: name or JSON (engine bench)")
    ap.add_argument("--mixed-step-times", metavar="JSON",
                    help="tools/mixed_step_time.py's timings (LatencyModel.mixed_prefill_ms)")
    ap.add_argument("--loop-ms", type=float, default=0.0,
                    help="serving loop ms per step (fitted by sim_vs_live --fit-loop-ms)")
    ap.add_argument("--kv-blocks", type=int, help="the worker's KV pool (16-token blocks)")
    ap.add_argument("--mixed-steps", action="store_true", help="the worker's --mixed-steps")
    ap.add_argument("--step-prefill-tokens", default="",
                    help="the worker's fixed step prefill budget(s), comma-separated "
                         "(default: the model's)")
    ap.add_argument("--point", action="append", required=True,
                    help="POLICY[:KEY=VALUE,...]@RATE[,RATE...] (repeatable)")
    ap.add_argument("--seconds", type=float, default=90.0, help="trace seconds per point")
    ap.add_argument("--ttft-ms", type=float, default=2000.0)
    ap.add_argument("--tpot-ms", type=float, default=50.0)
    ap.add_argument("--goal", type=float, default=0.99)
    ap.add_argument("--out", help="JSON of every simulated point")
    a = ap.parse_args(argv)
    try:
        points = [parse_point(t) for t in a.point]
        budgets = [int(x) for x in a.step_prefill_tokens.split(",") if x.strip()] or [None]
        trace = tr.load_trace(a.trace)
        model = replace(worker_model(a.model, a.mixed_step_times, a.kv_blocks),
                        loop_ms=a.loop_ms)
    except (ValueError, tr.TraceError, OSError) as e:
        ap.error(str(e))
    rows = []
    for budget in budgets:
        run = {"seconds_per_point": a.seconds, "mixed_steps": a.mixed_steps, "goal": a.goal,
               "sla": {"ttft_ms": a.ttft_ms, "tpot_ms": a.tpot_ms},
               "step_prefill_tokens": budget}
        rows += sweep(points, run, trace, model)
    caps = capacities(rows, a.goal)
    print(f"SIMULATED, latency model {model.describe()}, loop_ms {model.loop_ms}")
    print(f"{'policy':>28} {'step':>6} {'rps':>6} {'reqs':>5} {'attain':>7} {'TTFT p99':>9} "
          f"{'TPOT p99':>9} {'max KV':>7}")
    for r in rows:
        print(f"{r['label']:>28} {r['step_prefill_tokens'] or '-':>6} {r['rps']:>6g} "
              f"{r['requests']:>5} {100 * r['sla_attainment']:>6.1f}% {r['ttft_p99_ms']:>9.0f} "
              f"{r['tpot_p99_ms']:>9.2f} {100 * r['max_kv_used']:>6.0f}%")
    print(json.dumps(caps, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps({
            "what": "a live capacity grid, simulated (not measured)", "command": " ".join(sys.argv),
            "model": model.to_json(), "settings": vars(a), "points": rows,
            "capacity_rps": caps}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
