"""Capacity measured on a live stack: each policy's SLA attainment at given arrival rates.

    python -m dynabatch.bench.live_capacity --trace azure_llm_conv_2023.csv \\
        --model llama-3.1-8b-shape --device cuda --kv-blocks 1024 --seconds 40 \\
        --point fcfs@2,3,4 --point dynamic@2,3,4 --point 'fcfs:max_num_seqs=16@3' --out run.json

One worker process serves the whole run (model loaded and graphs captured once); every point
gets a fresh scheduler process (the policy's controller starts from its defaults, as in the
simulator) and replays the first ``rate x --seconds`` requests of the trace, rescaled to that
mean rate, open loop through the SDK (bench.replay). A point starts only once the worker is idle.
Rates of a policy run in increasing order and stop after the first one below the goal.
Capacity = the highest rate probed at >= goal attainment (a grid, not a bisection: policies
within one grid step are not distinguished). The JSON is rewritten after every point, so a run
cut short by --budget-s (or killed) keeps what it measured; each point also keeps every request
(queue, TTFT, TPOT) and the stats timeline as rows (`raw`), to study tails after the fact.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dynabatch.bench import procs
from dynabatch.bench import traces as tr
from dynabatch.bench.metrics import raw_rows, summarize
from dynabatch.bench.replay import replay
from dynabatch.scheduler_svc.policy import POLICY_NAMES


@dataclass(frozen=True)
class Point:
    """A policy (with option overrides) and the rates to probe it at."""
    policy: str
    opts: tuple[str, ...]
    rates: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.policy + (f"[{','.join(self.opts)}]" if self.opts else "")


def parse_point(text: str) -> Point:
    """``POLICY[:KEY=VALUE,...]@RATE,RATE,...``, e.g. ``fcfs:max_num_seqs=32@2,3.5``."""
    spec, sep, rates = text.rpartition("@")
    if not sep or not spec:
        raise ValueError(f"--point {text!r}: expected POLICY[:KEY=VALUE,...]@RATE[,RATE...]")
    policy, _, opts = spec.partition(":")
    if policy not in POLICY_NAMES:
        raise ValueError(f"--point {text!r}: unknown policy {policy!r}")
    try:
        values = tuple(sorted(float(r) for r in rates.split(",")))
    except ValueError:
        raise ValueError(f"--point {text!r}: rates must be numbers") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--point {text!r}: rates must be > 0")
    return Point(policy, tuple(o for o in opts.split(",") if o), values)


def segment(trace: tr.Trace, rate: float, seconds: float, min_requests: int = 20) -> tr.Trace:
    """The first ``rate x seconds`` requests (at least ``min_requests``), at mean ``rate``."""
    n = max(min_requests, round(rate * seconds))
    return tr.to_rps(tr.window(trace, first_n=n), rate)


async def _wait_idle(target: str, timeout_s: float = 120.0) -> None:
    """Until the scheduler reports nothing waiting or running (bounded)."""
    from dynabatch.client import AsyncDynabatchClient
    deadline = time.monotonic() + timeout_s
    async with AsyncDynabatchClient(target) as client:
        while time.monotonic() < deadline:
            st = await client.stats()
            if st.waiting == 0 and all(w.running == 0 for w in st.workers):
                return
            await asyncio.sleep(0.25)
    raise TimeoutError(f"stack not idle after {timeout_s:.0f} s")


class Run:
    """Collects every point's summary and rewrites the JSON after each."""

    def __init__(self, a: argparse.Namespace, trace: tr.Trace) -> None:
        self.a, self.trace, self.t0 = a, trace, time.monotonic()
        self.prefix = f"dynabatch-live-{os.getpid()}:"
        self.data = {"what": "capacity on a live stack (measured, not simulated)",
                     "machine": _machine(a.device), "command": " ".join(sys.argv),
                     "model": a.model, "kv_blocks": a.kv_blocks, "max_running": a.max_running,
                     "mixed_steps": a.mixed_steps, "step_prefill_tokens": a.step_prefill_tokens,
                     "trace": trace.source, "seconds_per_point": a.seconds, "goal": a.goal,
                     "sla": {"ttft_ms": a.ttft_ms, "tpot_ms": a.tpot_ms},
                     "points": [], "skipped": [], "capacity_rps": {}}

    def over_budget(self) -> bool:
        return time.monotonic() - self.t0 + self.a.seconds * 1.5 + 10 > self.a.budget_s

    async def probe(self, p: Point, rate: float) -> dict:
        seg = segment(self.trace, rate, self.a.seconds)
        async with procs.scheduler(self.a.redis_url, self.prefix, self.a.model, p.policy,
                                   list(p.opts)) as sched:
            run = await replay(seg, sched.health, self.a.ttft_ms / 1000, self.a.tpot_ms / 1000,
                               self.a.vocab, self.a.seed)
            await _wait_idle(sched.health)
        s = summarize(run)
        s.update(label=p.label, policy=p.policy, opts=list(p.opts), target_rps=rate,
                 segment_requests=len(seg), raw=raw_rows(run))
        self.data["points"].append(s)
        self.save()
        return s

    async def sweep(self, p: Point) -> None:
        best = 0.0
        for i, rate in enumerate(p.rates):
            if self.over_budget():
                self.data["skipped"].append({"label": p.label, "rates": list(p.rates[i:]),
                                             "why": "budget"})
                break
            s = await self.probe(p, rate)
            print(f"{p.label:>28} @ {rate:7.2f} req/s: attainment {100 * s['sla_attainment']:5.1f}%"
                  f"  TTFT p99 {s['ttft_ms']['p99']:8.0f} ms  TPOT p99 {s['tpot_ms']['p99']:6.1f} ms"
                  f"  {s['counts']}", flush=True)
            if s["sla_attainment"] < self.a.goal:
                if p.rates[i + 1:]:
                    self.data["skipped"].append({"label": p.label, "rates": list(p.rates[i + 1:]),
                                                 "why": "a lower rate missed the goal"})
                break
            best = rate
        self.data["capacity_rps"][p.label] = best
        self.save()

    def save(self) -> None:
        if self.a.out:
            Path(self.a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.a.out).write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def _warmup(trace: tr.Trace, points: list[Point], seconds: float) -> tr.Trace:
    """Discarded load before the first point: the trace's start at the first point's lowest
    rate for `seconds` (at least 4 requests), so that the first measured point does not pay
    for the worker's first large batches and prompts (session 4's first 1B point ran at mean
    batch 131 and TPOT 10.2 ms where a later point of the same arrivals ran at 94 and 6.8)."""
    return segment(trace, points[0].rates[0], seconds, min_requests=4)


def _worker_flags(a: argparse.Namespace) -> list[str]:
    steps = ["--step-prefill-tokens", str(a.step_prefill_tokens)] if a.step_prefill_tokens else []
    return (["--mixed-steps"] if a.mixed_steps else []) + steps


async def run(a: argparse.Namespace, points: list[Point], trace: tr.Trace) -> dict:
    r = Run(a, trace)
    async with procs.worker(a.redis_url, r.prefix, a.model, a.device, a.max_running,
                            a.kv_blocks, a.engine,
                            extra=_worker_flags(a)):
        r.data["worker_ready_s"] = round(time.monotonic() - r.t0, 1)
        async with procs.scheduler(a.redis_url, r.prefix, a.model, "fcfs") as sched:
            warm = _warmup(trace, points, a.warmup_s)
            r.data["warmup"] = {"requests": len(warm), "rps": points[0].rates[0],
                                "seconds": a.warmup_s}
            await replay(warm, sched.health, 600, 60, a.vocab, a.seed)
            await _wait_idle(sched.health)
        for p in points:
            await r.sweep(p)
    r.data["wall_s"] = round(time.monotonic() - r.t0, 1)
    r.save()
    procs.drop_keys(a.redis_url, r.prefix)
    return r.data



def _machine(device: str) -> str:
    gpu = "cpu"
    if device != "cpu":
        try:
            import torch
            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except ImportError:
            pass
    return f"{platform.node()}: {gpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    from dynabatch.bench.commands import add_trace_args, trace_from_args
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trace_args(p)
    g = p.add_argument_group("stack")
    g.add_argument("--model", default="tiny-random-llama")
    g.add_argument("--engine", default="torch", choices=["torch", "fake"])
    g.add_argument("--device", default="auto")
    g.add_argument("--max-running", type=int, default=256, help="the worker's hard cap")
    g.add_argument("--kv-blocks", type=int, help="limit the worker's KV pool (16-token blocks)")
    g.add_argument("--mixed-steps", action="store_true",
                   help="the worker's engine runs decodes inside prefill steps (dynamic policies "
                        "then cap each step's prompt tokens to the TPOT target)")
    g.add_argument("--step-prefill-tokens", type=int,
                   help="the worker's most prompt tokens per step (default: the worker's, 8192)")
    g.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    g = p.add_argument_group("sweep")
    g.add_argument("--point", action="append", required=True,
                   help="POLICY[:KEY=VALUE,...]@RATE[,RATE...] (repeatable)")
    g.add_argument("--seconds", type=float, default=30.0, help="trace seconds per point")
    g.add_argument("--warmup-s", type=float, default=5.0,
                   help="discarded load before the first point, at its rate (trace seconds)")
    g.add_argument("--ttft-ms", type=float, default=2000.0)
    g.add_argument("--tpot-ms", type=float, default=50.0)
    g.add_argument("--goal", type=float, default=0.99)
    g.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no point that could end after this many seconds")
    g.add_argument("--vocab", type=int, default=256)
    g.add_argument("--out", help="JSON, rewritten after every point")
    a = p.parse_args(argv)
    try:
        points = [parse_point(t) for t in a.point]
        trace = trace_from_args(a)
    except (ValueError, tr.TraceError, OSError) as e:
        p.error(str(e))
    data = asyncio.run(run(a, points, trace))
    print(json.dumps(data["capacity_rps"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
