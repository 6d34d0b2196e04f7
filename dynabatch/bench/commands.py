"""`dynabatch bench ...`: simulate, replay, capacity, report (and `simulate --speed`).

The CLI mounts this with ``add_subcommands(subparsers)``; ``python -m dynabatch.bench.commands``
runs it standalone. Each handler returns a process exit code.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from dynabatch.bench import traces as tr


def add_trace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", help="trace file (Azure CSV, BurstGPT CSV or Mooncake JSONL)")
    g.add_argument("--format", default="auto", choices=["auto", *tr.FORMATS])
    g.add_argument("--synthetic", choices=["poisson", "gamma"],
                   help="generate arrivals instead of --trace (lengths: log-normal, Azure means)")
    g.add_argument("--n", type=int, default=1000, help="synthetic: number of requests")
    g.add_argument("--rate", type=float, default=5.0, help="synthetic: mean req/s")
    g.add_argument("--cv", type=float, default=3.0, help="gamma: coefficient of variation of gaps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--start", type=float, default=0.0, help="window start (s into the trace)")
    g.add_argument("--end", type=float, default=float("inf"), help="window end (s)")
    g.add_argument("--first", type=int, help="keep the first N requests (after the window)")
    g.add_argument("--scale", type=float, help="compress arrivals: x K request rate")
    g.add_argument("--rps", type=float, help="rescale arrivals to this mean req/s")
    g.add_argument("--max-prompt", type=int)
    g.add_argument("--max-output", type=int)


def trace_from_args(a: argparse.Namespace) -> tr.Trace:
    if a.synthetic:
        gen = tr.poisson if a.synthetic == "poisson" else tr.gamma_bursty
        kw = {"cv": a.cv} if a.synthetic == "gamma" else {}
        t = gen(a.rate, a.n, seed=a.seed, **kw)
    elif a.trace:
        t = tr.load_trace(a.trace, a.format)
    else:
        raise tr.TraceError("give --trace FILE or --synthetic poisson|gamma")
    if a.start or a.end != float("inf") or a.first:
        t = tr.window(t, a.start, a.end, a.first)
    if a.scale:
        t = tr.scale_rate(t, a.scale)
    if a.rps:
        t = tr.to_rps(t, a.rps)
    if a.max_prompt or a.max_output:
        t = tr.cap_lengths(t, a.max_prompt, a.max_output)
    return t


def add_sim_args(p: argparse.ArgumentParser, many: bool = True) -> None:
    g = p.add_argument_group("simulation")
    g.add_argument("--policies" if many else "--policy", dest="policies",
                   default="naive,fcfs,dynamic,static,multibin" if many else "dynamic",
                   help="policy name(s), comma-separated")
    g.add_argument("--model", default="h200-llama1b",
                   help="latency model: shipped name or JSON path (model or engine-bench file)")
    g.add_argument("--kv-blocks", type=int, help="override the model's KV pool (blocks)")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--ttft-ms", type=float, default=2000.0, help="SLA: time to first token")
    g.add_argument("--tpot-ms", type=float, default=50.0, help="SLA: time per output token")
    g.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override a PolicyConfig field (repeatable), e.g. reserve_output=false")
    g.add_argument("--mixed-steps", action="store_true",
                   help="decodes ride along prefill steps (the worker's --mixed-steps), also "
                        "for a model fitted to the alternating engine")
    g.add_argument("--no-admission", action="store_true",
                   help="ablation: accept every arrival (skip policy.admit)")
    g.add_argument("--max-tokens", default="2048",
                   help="max_tokens sent per request: a cap, or 'exact' (= the trace's length)")


def _value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def policy_overrides(opts: list[str]) -> dict:
    out = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise tr.TraceError(f"--policy-opt wants KEY=VALUE, got {opt!r}")
        out[key.strip()] = _value(value.strip())
    return out


def sim_config(a: argparse.Namespace, policy: str):
    from dynabatch.bench.latency_model import load_model
    from dynabatch.bench.simulator import SimConfig
    model = load_model(a.model)
    if a.kv_blocks:
        model = model.with_kv(a.kv_blocks)
    return SimConfig(policy=policy, model=model, workers=a.workers,
                     ttft_target_s=a.ttft_ms / 1000, tpot_target_s=a.tpot_ms / 1000,
                     max_tokens=None if a.max_tokens == "exact" else int(a.max_tokens),
                     policy_overrides=policy_overrides(a.policy_opt),
                     admission=not a.no_admission, mixed_steps=a.mixed_steps)


def _policies(a: argparse.Namespace) -> list[str]:
    return [p.strip() for p in a.policies.split(",") if p.strip()]


def cmd_simulate(a: argparse.Namespace) -> int:
    if a.speed:
        from dynabatch.bench.sim_speed import main as speed
        return speed(a.speed_n, a.out or "bench/results/sim_speed.json")
    from dynabatch.bench.metrics import summarize
    from dynabatch.bench.simulator import simulate
    t = trace_from_args(a)
    print(t.describe(), file=sys.stderr)
    out = {}
    for p in _policies(a):
        s = summarize(simulate(t, sim_config(a, p)))
        out[p] = s
        if not a.json:
            print(f"{p:>10}: attainment {100 * s['sla_attainment']:.1f}%  goodput "
                  f"{s['goodput_rps']:.2f}/s  throughput {s['throughput_rps']:.2f}/s "
                  f"({s['output_tok_s']:.0f} tok/s)  TTFT p50/p99 {s['ttft_ms']['p50']:.0f}/"
                  f"{s['ttft_ms']['p99']:.0f} ms  TPOT p50/p99 {s['tpot_ms']['p50']:.1f}/"
                  f"{s['tpot_ms']['p99']:.1f} ms  rejected {s['counts']['rejected']}  "
                  f"[simulated, {s['meta']['latency_model']}, {s['meta']['wall_s']:.1f} s]")
    if a.json:
        print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_capacity(a: argparse.Namespace) -> int:
    from dynabatch.bench.capacity import search_policies
    t = trace_from_args(a)
    pols = _policies(a)
    res = search_policies(t, sim_config(a, pols[0]), pols, jobs=a.jobs, goal=a.goal,
                          start_rps=t.mean_rps or 1.0,
                          progress=lambda p, r, s: print(
                              f"  {p}: {r:.2f} req/s -> "
                              + (f"{100 * s['sla_attainment']:.1f}%" if "sla_attainment" in s
                                 else "done"), file=sys.stderr))
    if a.json:
        print(json.dumps({p: r.to_json() for p, r in res.items()}, indent=1, default=str))
    else:
        for p, r in res.items():
            print(f"{p:>10}: capacity {r.capacity_rps:.2f} req/s at >= {100 * a.goal:.0f}% "
                  f"SLA attainment ({len(r.points)} probes, simulated)")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from dynabatch.bench import report
    t = trace_from_args(a)
    grid = tuple(float(x) for x in a.grid.split(",")) if a.grid else report.GRID
    if 1.0 not in grid:
        grid = grid + (1.0,)
    data, runs = report.build(t, sim_config(a, "dynamic"), _policies(a), jobs=a.jobs,
                              load_rps=a.load_rps, goal=a.goal, grid=grid)
    command = a.command_line or "dynabatch bench " + " ".join(map(shlex.quote, sys.argv[1:]))
    notes = Path(a.notes).read_text() if a.notes else ""
    md = report.write(data, runs, Path(a.out), command, notes)
    print(json.dumps(data, indent=1, default=str) if a.json else md.read_text())
    return 0


def cmd_replay(a: argparse.Namespace) -> int:
    from dynabatch.bench.replay import main as replay_main
    return replay_main(a, trace_from_args(a))


def _guard(fn):
    """A handler that turns an unreadable trace or unknown model into a one-line error."""
    def run(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except (tr.TraceError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def _defaults(p: argparse.ArgumentParser, fn) -> None:
    # `func` for main() below, `bench_run` for the `dynabatch bench` mount in dynabatch.cli.
    p.set_defaults(func=_guard(fn), bench_run=_guard(fn))


def add_subcommands(subparsers) -> None:
    s = subparsers.add_parser("simulate", help="simulate policies on a trace (discrete-event, "
                              "real policy code, latency model)")
    add_trace_args(s)
    add_sim_args(s, many=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("--speed", action="store_true", help="run the simulator speed benchmark")
    s.add_argument("--speed-n", type=int, default=100_000)
    s.add_argument("--out", help="--speed: JSON output path")
    _defaults(s, cmd_simulate)

    c = subparsers.add_parser("capacity", help="highest req/s per policy at >= 99%% SLA "
                              "attainment (simulated)")
    add_trace_args(c)
    add_sim_args(c)
    c.add_argument("--goal", type=float, default=0.99)
    c.add_argument("--jobs", type=int, default=1, help="parallel processes (one per policy)")
    c.add_argument("--json", action="store_true")
    _defaults(c, cmd_capacity)

    r = subparsers.add_parser("report", help="Markdown + PNG + JSON comparison of policies "
                              "(capacity, common load, load sweep; simulated)")
    add_trace_args(r)
    add_sim_args(r)
    r.add_argument("--goal", type=float, default=0.99)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--load-rps", type=float, help="load of the table and plots (default: the "
                   "highest capacity found)")
    r.add_argument("--grid", help="load sweep as multiples of the table load, e.g. 0.5,1,1.5 "
                   "(default 0.25,0.5,0.75,1,1.25,1.5)")
    r.add_argument("--out", default="bench/results/report")
    r.add_argument("--notes", help="Markdown file appended to the report (the analysis)")
    r.add_argument("--command-line", help="the command to print in the report")
    r.add_argument("--json", action="store_true")
    _defaults(r, cmd_report)

    p = subparsers.add_parser("replay", help="replay a trace open-loop against a running stack "
                              "through the client SDK (same metrics as simulate)")
    add_trace_args(p)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--ttft-ms", type=float, default=2000.0)
    p.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--vocab", type=int, default=256, help="synthetic prompt token ids < vocab")
    p.add_argument("--driver", choices=("sdk", "many"), default="sdk",
                   help="a Generate call per request (sdk) or every request over one "
                        "GenerateMany call (many)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="write the summary JSON here")
    _defaults(p, cmd_replay)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dynabatch bench", description=__doc__)
    add_subcommands(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
