"""Ablations: one policy mechanism switched off at a time, same trace and load (simulated).

Used to attribute a difference between two policies to a mechanism (KV reservation for the
predicted output, admission control, the batch cap) rather than to a constant.

    python -m dynabatch.bench.ablation --trace azure.csv --model h200-llama8b-kv8g \
        --kv-blocks 1024 --rps 3.5 --out bench/results/ablation_kv2g
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from dynabatch.bench.commands import add_sim_args, add_trace_args, sim_config, trace_from_args
from dynabatch.bench.metrics import summarize
from dynabatch.bench.simulator import SimConfig, simulate
from dynabatch.bench.traces import Trace

# label -> (policy, PolicyConfig overrides, admission on)
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "fcfs": ("fcfs", {}, True),
    "fcfs, max_num_seqs=256": ("fcfs", {"max_num_seqs": 256}, True),
    "dynamic": ("dynamic", {}, True),
    "dynamic, no output reservation": ("dynamic", {"reserve_output": False}, True),
    "dynamic, no admission control": ("dynamic", {}, False),
    "dynamic, neither": ("dynamic", {"reserve_output": False}, False),
    "dynamic, fixed controller (no Alg. 1/2)": ("dynamic", {"controller": "fixed"}, True),
    "dynamic, FIFO order (no priority score)": ("dynamic", {"ordering": "fifo"}, True),
    "multibin": ("multibin", {}, True),
    "multibin, no output reservation": ("multibin", {"reserve_output": False}, True),
}


def _run(args: tuple[str, Trace, SimConfig]) -> tuple[str, dict]:
    label, trace, cfg = args
    return label, summarize(simulate(trace, cfg))


def run(trace: Trace, base: SimConfig, jobs: int = 2) -> dict[str, dict]:
    jobs_list = [(label, trace, replace(base, policy=p, admission=adm,
                                        policy_overrides={**base.policy_overrides, **ov}))
                 for label, (p, ov, adm) in VARIANTS.items()]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(_run, jobs_list))


def table(results: dict[str, dict]) -> str:
    rows = ["| variant | attainment | rejected | preempted | TTFT p99 (ms) | queue p99 (ms) "
            "| TPOT p99 (ms) | mean batch | mean KV used |", "|" + "---|" * 9]
    for label, s in results.items():
        rows.append(f"| {label} | {100 * s['sla_attainment']:.2f}% | {s['counts']['rejected']} "
                    f"| {s['preempted_requests']} | {s['ttft_ms']['p99']:,.0f} "
                    f"| {s['queue_ms']['p99']:,.0f} | {s['tpot_ms']['p99']:.1f} "
                    f"| {s['mean_batch']:.1f} | {100 * s['mean_kv_used']:.0f}% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trace_args(ap)
    add_sim_args(ap)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/ablation")
    a = ap.parse_args(argv)
    trace = trace_from_args(a)
    results = run(trace, sim_config(a, "dynamic"), a.jobs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    md = (f"# Ablations (SIMULATED)\n\nTrace: {trace.describe()}; transforms: "
          f"{', '.join(trace.notes) or 'none'}. Latency model: {sim_config(a, 'x').model.describe()}. "
          f"SLA: TTFT <= {a.ttft_ms:.0f} ms, TPOT <= {a.tpot_ms:.0f} ms.\n\n{table(results)}\n")
    (out / "ABLATION.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
