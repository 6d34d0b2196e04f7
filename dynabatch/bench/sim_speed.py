"""Simulator speed benchmark: N requests of the shared Azure trace shape, one core.

Arrivals: the Azure conversation trace's lengths resampled with Poisson arrivals at a load each
setting sustains (so the queue stays short and the figure measures the simulator, not a queue
blow-up). Prints a table, writes JSON with the host it ran on.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from dynabatch.bench.latency_model import load_model
from dynabatch.bench.metrics import summarize
from dynabatch.bench.simulator import SimConfig, simulate
from dynabatch.bench.traces import load_azure, poisson, resample_lengths

AZURE = Path(os.environ.get("DYNABATCH_AZURE_TRACE",
                            "/work/shared/workloads/azure_llm_conv_2023.csv"))
CASES = (("h200-llama1b", "dynamic", 20.0), ("h200-llama1b", "fcfs", 20.0),
         ("h200-llama8b-kv8g", "dynamic", 5.0), ("h200-llama8b-kv8g", "multibin", 5.0))


def main(n: int = 100_000, out: str = "bench/results/sim_speed.json") -> int:
    lengths = resample_lengths(load_azure(AZURE))
    rows = []
    print(f"{'model':>20} {'policy':>9} {'req/s':>6} {'requests':>9} {'wall s':>7} "
          f"{'sim s':>8} {'steps':>9} {'decides':>8} {'attain':>7}")
    for model, policy, rps in CASES:
        trace = poisson(rps, n, lengths, seed=1)
        t0 = time.perf_counter()
        run = simulate(trace, SimConfig(policy=policy, model=load_model(model)))
        wall = time.perf_counter() - t0
        s = summarize(run)
        row = {"model": model, "policy": policy, "rps": rps, "requests": n, "wall_s": wall,
               "simulated_s": s["span_s"], "steps": s["meta"]["steps"],
               "decides": s["meta"]["decides"], "sla_attainment": s["sla_attainment"],
               "requests_per_wall_s": n / wall}
        rows.append(row)
        print(f"{model:>20} {policy:>9} {rps:>6.1f} {n:>9} {wall:>7.1f} {s['span_s']:>8.0f} "
              f"{row['steps']:>9} {row['decides']:>8} {100 * s['sla_attainment']:>6.1f}%")
    doc = {"what": "simulator wall time on one core (single process), N requests",
           "host": {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": rows,
           "goal": "100,000 requests in < 60 s", "met": all(r["wall_s"] < 60 for r in rows)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}; goal met: {doc['met']}")
    return 0 if doc["met"] else 1


if __name__ == "__main__":
    import sys
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
