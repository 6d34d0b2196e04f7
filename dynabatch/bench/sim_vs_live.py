"""The simulator against live measurements: every point of a live capacity run, simulated.

    python -m dynabatch.bench.sim_vs_live --live live_8b.json --trace azure_llm_conv_2023.csv \\
        --model engine_h200_8b.json --fit-loop-ms --out sim_vs_live_8b.json \\
        [--mixed-step-times mixed_step_time.json]

Each live point (policy, options, rate, trace segment, SLA) is re-run in the simulator with the
same trace segment and the request's exact max_tokens (as replay sends them). The latency model
is fitted to the engine benchmark (engine alone); ``--fit-loop-ms`` adds the one thing the
engine benchmark cannot see, the serving loop's time per step (pull, publish, relay), fitted
to the live runs: the value whose simulated TPOT p50 best matches the measured, over the points
that met the goal (all points if none did), least total squared relative error on a grid.
Reported per point: throughput, output tok/s, attainment, TTFT p99, TPOT p50, each simulated
vs measured, and the relative error.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dynabatch.bench import traces as tr
from dynabatch.bench.commands import policy_overrides
from dynabatch.bench.latency_model import LatencyModel, fit_mixed_steps, load_model
from dynabatch.bench.live_capacity import segment
from dynabatch.bench.metrics import summarize
from dynabatch.bench.simulator import SimConfig, simulate

METRICS = {"throughput_rps": lambda s: s["throughput_rps"],
           "output_tok_s": lambda s: s["output_tok_s"],
           "sla_attainment": lambda s: s["sla_attainment"],
           "ttft_p99_ms": lambda s: s["ttft_ms"]["p99"],
           "tpot_p50_ms": lambda s: s["tpot_ms"]["p50"]}


def worker_model(name: str, mixed_step_times: str | None = None,
                 kv_blocks: int | None = None) -> LatencyModel:
    """The latency model of a live worker: an engine-bench fit (name or JSON), with the mixed
    steps' timings (tools/mixed_step_time.py JSON) and the worker's KV pool when given."""
    model = load_model(name)
    if mixed_step_times:
        model = fit_mixed_steps(model, json.loads(Path(mixed_step_times).read_text()))
    return model.with_kv(kv_blocks) if kv_blocks else model


def simulate_point(point: dict, live: dict, trace: tr.Trace, model: LatencyModel) -> dict:
    seg = segment(trace, point["target_rps"], live["seconds_per_point"])
    if live.get("step_prefill_tokens"):   # the worker's --step-prefill-tokens
        model = replace(model, max_batch_tokens=live["step_prefill_tokens"])
    cfg = SimConfig(policy=point["policy"], model=model, max_tokens=None,
                    ttft_target_s=live["sla"]["ttft_ms"] / 1000,
                    tpot_target_s=live["sla"]["tpot_ms"] / 1000,
                    policy_overrides=policy_overrides(point.get("opts", [])),
                    mixed_steps=live.get("mixed_steps", False))
    return summarize(simulate(seg, cfg))


def compare(live: dict, trace: tr.Trace, model: LatencyModel) -> list[dict]:
    rows = []
    for p in live["points"]:
        sim = simulate_point(p, live, trace, model)
        row = {"label": p["label"], "rps": p["target_rps"]}
        for name, get in METRICS.items():
            m, s = get(p), get(sim)
            row[name] = {"measured": round(m, 4), "simulated": round(s, 4),
                         "rel_err": round(s / m - 1, 4) if m else None}
        rows.append(row)
    return rows


def fit_loop_ms(live: dict, trace: tr.Trace, model: LatencyModel,
                grid: list[float]) -> tuple[float, dict[float, float]]:
    """The grid value whose simulated TPOT p50 best matches the sustained points."""
    pts = [p for p in live["points"] if p["sla_attainment"] >= live["goal"]] or live["points"]
    loss = {}
    for ms in grid:
        m = replace(model, loop_ms=ms)
        errs = [simulate_point(p, live, trace, m)["tpot_ms"]["p50"] / p["tpot_ms"]["p50"] - 1
                for p in pts]
        loss[ms] = sum(e * e for e in errs)
    return min(loss, key=loss.get), loss


def plot(rows: list[dict], path: str, title: str) -> None:
    """Measured (solid, o) vs simulated (dashed, x) per policy: attainment, TTFT p99, TPOT p50."""
    from dynabatch.bench.plots import pyplot, save
    plt = pyplot()
    panels = (("sla_attainment", "SLA attainment", 100), ("ttft_p99_ms", "TTFT p99 (ms)", 1),
              ("tpot_p50_ms", "TPOT p50 (ms)", 1))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        pts = sorted((r for r in rows if r["label"] == label), key=lambda r: r["rps"])
        x = [r["rps"] for r in pts]
        for ax, (key, name, scale) in zip(axes, panels):
            color = f"C{i}"
            ax.plot(x, [scale * r[key]["measured"] for r in pts], "o-", color=color,
                    label=f"{label} measured")
            ax.plot(x, [scale * r[key]["simulated"] for r in pts], "x--", color=color,
                    label=f"{label} simulated")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("offered load (req/s)")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, title, path)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.0f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--live", required=True, help="live_capacity JSON")
    ap.add_argument("--trace", required=True)
    ap.add_argument("--model", required=True, help="latency model: name or JSON (engine bench)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--fit-loop-ms", action="store_true", help="fit loop_ms to this live run")
    g.add_argument("--loop-ms", type=float, help="use this loop_ms (e.g. fitted to another run)")
    ap.add_argument("--mixed-step-times", metavar="JSON",
                    help="tools/mixed_step_time.py's whole-step timings: fit what a chunk "
                         "beside decodes costs (LatencyModel.mixed_prefill_ms)")
    ap.add_argument("--grid", default="0,0.5,1,1.5,2,3,4,6,8")
    ap.add_argument("--out")
    ap.add_argument("--plot", help="PNG: measured vs simulated per policy and rate")
    a = ap.parse_args(argv)
    live = json.loads(Path(a.live).read_text())
    trace = tr.load_trace(a.trace)
    model = worker_model(a.model, a.mixed_step_times, live.get("kv_blocks"))
    loss = {}
    if a.fit_loop_ms:
        best, loss = fit_loop_ms(live, trace, model, [float(x) for x in a.grid.split(",")])
        model = replace(model, loop_ms=best)
    elif a.loop_ms is not None:
        model = replace(model, loop_ms=a.loop_ms)
    rows = compare(live, trace, model)
    out = {"live": a.live, "model": model.to_json(), "loop_ms_fit_loss": loss, "points": rows}
    print(f"latency model {model.describe()}, loop_ms {model.loop_ms}")
    print(f"{'policy':>28} {'rps':>6} " + " ".join(f"{k:>26}" for k in METRICS))
    for r in rows:
        cells = [f"{r[k]['simulated']:>9.4g} / {r[k]['measured']:<9.4g} {_pct(r[k]['rel_err']):>5}"
                 for k in METRICS]
        print(f"{r['label']:>28} {r['rps']:>6g} " + " ".join(cells))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    if a.plot:
        plot(rows, a.plot, f"{Path(a.live).name}: measured vs simulated (latency model "
                           f"{model.name}, serving loop {model.loop_ms:g} ms/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
