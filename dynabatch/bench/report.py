"""The comparison report: capacity per policy, every policy at a common load, a load sweep;
a Markdown table, JSON and PNG plots. Everything here is SIMULATED (see the latency model's
provenance in the report header)."""
from __future__ import annotations

import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

from dynabatch.bench import plots
from dynabatch.bench.capacity import CapacityResult, search
from dynabatch.bench.metrics import RunResult, summarize
from dynabatch.bench.simulator import SimConfig, simulate
from dynabatch.bench.traces import Trace, to_rps

GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)   # load sweep, as multiples of the reference load


def _run(args: tuple) -> tuple[str, float, dict, RunResult | None]:
    trace, cfg, rps, keep = args
    run = simulate(to_rps(trace, rps), cfg)
    s = summarize(run)
    s["target_rps"] = rps
    return cfg.policy, rps, s, (run if keep else None)


def _search(args: tuple) -> CapacityResult:
    trace, cfg, kwargs = args
    return search(trace, cfg, **kwargs)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=False)


def build(trace: Trace, cfg: SimConfig, policies: list[str], jobs: int = 2,
          load_rps: float | None = None, goal: float = 0.99,
          grid: tuple[float, ...] = GRID) -> tuple[dict, dict[str, RunResult]]:
    """Run the searches and the sweep; returns (report data, full runs at the reference load)."""
    t0 = time.perf_counter()
    cfgs = {p: replace(cfg, policy=p) for p in policies}
    caps: dict[str, CapacityResult] = {}
    with _progress() as bar, ProcessPoolExecutor(max_workers=jobs) as pool:
        task = bar.add_task("capacity search", total=len(policies))
        futs = [pool.submit(_search, (trace, c, {"goal": goal, "start_rps": trace.mean_rps or 1.0}))
                for c in cfgs.values()]
        for f in as_completed(futs):
            res = f.result()
            caps[res.policy] = res
            bar.advance(task)
        ref = load_rps or max(c.capacity_rps for c in caps.values()) or trace.mean_rps
        jobs_list = [(trace, cfgs[p], ref * g, g == 1.0) for p in policies for g in grid]
        task = bar.add_task(f"load sweep (ref {ref:.2f} req/s)", total=len(jobs_list))
        sweep: dict[str, list[dict]] = {p: [] for p in policies}
        runs: dict[str, RunResult] = {}
        for f in as_completed([pool.submit(_run, j) for j in jobs_list]):
            policy, rps, s, run = f.result()
            sweep[policy].append(s)
            if run is not None:
                runs[policy] = run
            bar.advance(task)
    for p in policies:
        sweep[p].sort(key=lambda s: s["target_rps"])
    runs = {p: runs[p] for p in policies if p in runs}     # legend order = the order asked
    m = cfg.model
    data = {
        "simulated": True,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                f"python {platform.python_version()})",
        "wall_s": None,
        "code_commit": code_version(),
        "trace": trace.describe(), "trace_notes": trace.notes,
        "latency_model": m.to_json(), "latency_model_summary": m.describe(),
        "sla": {"ttft_s": cfg.ttft_target_s, "tpot_s": cfg.tpot_target_s, "goal": goal},
        "config": {k: v for k, v in vars(cfg).items() if k not in ("model", "policy")},
        "reference_rps": ref,
        "capacity": {p: c.to_json() for p, c in caps.items()},
        "at_reference": {p: next(s for s in sweep[p] if s["target_rps"] == ref * 1.0)
                         for p in policies},
        "sweep": sweep,
    }
    data["wall_s"] = time.perf_counter() - t0
    return data, runs


def code_version() -> str:
    """The git commit of the code that ran (DYNABATCH_COMMIT when the tree has no .git)."""
    import os
    import subprocess
    if os.environ.get("DYNABATCH_COMMIT"):
        return os.environ["DYNABATCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _f(x: float, nd: int = 0) -> str:
    return "-" if x != x else f"{x:,.{nd}f}"


def markdown(data: dict, command: str = "", notes: str = "") -> str:
    sla = data["sla"]
    rows = ["| policy | capacity (req/s @ ≥99%) | attainment | goodput | throughput | out tok/s "
            "| TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | queue p50 / p99 (ms) "
            "| rejected | preempted | mean batch | mean KV used |",
            "|" + "---|" * 13]
    for p, s in data["at_reference"].items():
        t, o, q = s["ttft_ms"], s["tpot_ms"], s["queue_ms"]
        rows.append(
            f"| {p} | {data['capacity'][p]['capacity_rps']:.2f} | {100 * s['sla_attainment']:.1f}% "
            f"| {s['goodput_rps']:.2f} | {s['throughput_rps']:.2f} | {_f(s['output_tok_s'])} "
            f"| {_f(t['p50'])} / {_f(t['p90'])} / {_f(t['p99'])} "
            f"| {_f(o['p50'], 1)} / {_f(o['p90'], 1)} / {_f(o['p99'], 1)} "
            f"| {_f(q['p50'])} / {_f(q['p99'])} | {s['counts']['rejected']} "
            f"| {s['preempted_requests']} | {_f(s['mean_batch'], 1)} | {100 * s['mean_kv_used']:.0f}% |")
    lm = data["latency_model"]
    prov = lm["provenance"]
    parts = [
        "# Policy comparison (SIMULATED)", "",
        f"Generated {data['generated']} on {data['host']} in {data['wall_s']:.0f} s from code at "
        f"commit {data.get('code_commit', 'unknown')}. "
        "Every figure is from the discrete-event simulator running the real policy code "
        "(dynabatch.scheduler_svc.policy) against a latency model; none is a GPU measurement.", "",
        f"- **Latency model:** {data['latency_model_summary']}",
        f"- **Its provenance:** {prov.get('kind')}; source: {prov.get('source', '-')}. "
        f"{prov.get('assumptions', '')}",
        f"- **Trace:** {data['trace']}; transforms: {', '.join(data['trace_notes']) or 'none'}",
        f"- **SLA:** TTFT ≤ {sla['ttft_s'] * 1000:.0f} ms and TPOT ≤ {sla['tpot_s'] * 1000:.0f} ms "
        f"per request; attainment counts rejected/expired requests as misses; capacity = highest "
        f"mean arrival rate with attainment ≥ {100 * sla['goal']:.0f}% (bisection to 4%).",
        f"- **Table load:** {data['reference_rps']:.2f} req/s (the highest capacity found), the "
        "same trace rescaled for every policy.",
    ]
    if command:
        parts += [f"- **Command:** `{command}`"]
    parts += ["", *rows, "",
              "![latency CDFs](latency_cdf.png)", "", "![goodput vs load](goodput_vs_load.png)",
              "", "![batch and KV over time](timeline.png)", ""]
    if notes:
        parts += [notes.strip(), ""]
    return "\n".join(parts)


def write(data: dict, runs: dict[str, RunResult], out: Path, command: str = "",
          notes: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sla = data["sla"]
    title = f"SIMULATED: {data['latency_model']['name']}, {data['reference_rps']:.2f} req/s"
    plots.latency_cdfs(runs, out / "latency_cdf.png", title, sla["ttft_s"], sla["tpot_s"])
    curves = {p: data["sweep"][p] + [s for s in data["capacity"][p]["points"]
                                      if not s["meta"].get("stopped_early")]
              for p in data["sweep"]}
    plots.goodput_vs_load(curves, out / "goodput_vs_load.png",
                          f"SIMULATED: {data['latency_model']['name']}")
    plots.timelines(runs, out / "timeline.png", title)
    (out / "report.json").write_text(json.dumps(data | {"command": command}, indent=1,
                                                default=str) + "\n")
    md = out / "REPORT.md"
    md.write_text(markdown(data, command, notes))
    return md
