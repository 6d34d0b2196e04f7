"""What the sidecar costs: one workload through the engine in-process, then through the whole
path (client SDK -> gRPC -> scheduler -> Redis -> worker -> back), on the same machine.

    python -m dynabatch.bench.sidecar --model llama-3.2-1b-shape --device cuda \
        --redis-url redis://127.0.0.1:6379/0 --out bench/results/sidecar_h200.json

Two workloads, both measured by the same clock rules (metrics.RequestRecord):
  offline   N requests at t=0 -> throughput ratio (whole path / in-process)
  moderate  Poisson arrivals at --load x the in-process offline request rate -> TTFT/TPOT added
The scheduler and the worker run as separate processes (`dynabatch scheduler`, `dynabatch
worker`), as deployed; the replay client runs in this process, or with --client-procs N in N
processes on one clock (bench/replay.py replay_parallel).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from dynabatch.bench import procs
from dynabatch.bench.metrics import (Outcome, RequestRecord, RunResult, hops, raw_rows,
                                     summarize)
from dynabatch.bench.replay import prompt_ids, replay, replay_parallel
from dynabatch.bench.traces import Trace, TraceRequest, poisson


def offline_trace(n: int, prompt: int, output: int) -> Trace:
    return Trace([TraceRequest(0.0, prompt, output) for _ in range(n)], f"offline({n}x{prompt}+{output})")


def drive_direct(engine, trace: Trace, vocab: int, seed: int) -> RunResult:
    """Feed the trace to the engine at its arrival times, in this thread; same record rules."""
    from dynabatch.worker_svc.engine.api import SequenceRequest
    rng = random.Random(seed)
    recs = [RequestRecord(f"d{i}", r.arrival_s, r.prompt_tokens, r.output_tokens, 1e9, 1e9)
            for i, r in enumerate(trace.requests)]
    by_id = {r.request_id: r for r in recs}
    produced = dict.fromkeys(by_id, 0)
    steps: dict[str, dict[str, float]] = {}
    nxt, t0 = 0, time.perf_counter()
    while nxt < len(recs) or engine.has_work():
        now = time.perf_counter() - t0
        while nxt < len(recs) and recs[nxt].arrival_s <= now:
            r = recs[nxt]
            engine.add(SequenceRequest(r.request_id, prompt_ids(r.prompt_tokens, vocab, rng),
                                       r.output_tokens, ignore_eos=True))
            nxt += 1
        if not engine.has_work():
            time.sleep(max(0.0, recs[nxt].arrival_s - now))
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        if engine.last_step is not None:
            kind = steps.setdefault(engine.last_step.kind, {"steps": 0, "seconds": 0.0})
            kind["steps"] += 1
            kind["seconds"] += engine.last_step.seconds
        for o in outs:
            rec = by_id[o.request_id]
            if o.token_ids and rec.first_token_s < 0:
                rec.first_token_s = rec.assigned_s = now
            produced[o.request_id] += len(o.token_ids)
            if o.finish_reason:
                rec.finish_s, rec.outcome = now, Outcome.OK
                rec.output_tokens = produced[o.request_id]
    return RunResult(recs, label="in-process", meta={"path": "engine in-process",
                                                     "engine_steps": procs.step_delta({}, steps)})


@contextlib.asynccontextmanager
async def _stack(a: argparse.Namespace):
    """--schedulers scheduler processes on one port (fcfs, as many slots as the worker) and the
    worker, as separate processes."""
    prefix = f"dynabatch-sidecar-{os.getpid()}:"
    async with contextlib.AsyncExitStack() as stack:
        worker = await stack.enter_async_context(
            procs.worker(a.redis_url, prefix, a.model, a.device, a.max_running))
        scheds = []
        for _ in range(a.schedulers):
            scheds.append(await stack.enter_async_context(procs.scheduler(
                a.redis_url, prefix, a.model, "fcfs", [f"max_num_seqs={a.max_running}"],
                listen=scheds[0].health if scheds else None)))
        yield scheds, worker
    procs.drop_keys(a.redis_url, prefix)


def _summary(run: RunResult) -> dict:
    """The run's summary plus every request as a row (queue time from the server's Timings on
    the whole path), so the added TTFT can be split after the fact. Its meta holds the engine's
    steps by kind (count, total and mean time): how the two paths' step patterns differ. A
    whole-path run also has its requests' hops (send -> scheduler -> ... -> client, ms)."""
    return summarize(run) | {"raw": raw_rows(run)} | ({"hops_ms": h} if (h := hops(run)) else {})


def _added(direct: dict, stack: dict) -> dict:
    return {m: {q: round(stack[m][q] - direct[m][q], 3) for q in ("p50", "p99")}
            for m in ("ttft_ms", "tpot_ms")}


def run(a: argparse.Namespace) -> dict:
    from dynabatch.worker_svc.engine import build_engine
    offline = offline_trace(a.requests, a.prompt, a.output)
    engine = build_engine(a.model, device=a.device, max_running=a.max_running, kv_fraction=0.4)
    drive_direct(engine, offline_trace(min(8, a.requests), a.prompt, 8), a.vocab, 1)  # warm-up
    direct_off = _summary(drive_direct(engine, offline, a.vocab, a.seed))
    rate = a.load * direct_off["throughput_rps"]
    moderate = poisson(rate, a.requests, lambda rng: (a.prompt, a.output), seed=a.seed)
    direct_mod = _summary(drive_direct(engine, moderate, a.vocab, a.seed))
    del engine
    _empty_cache()

    async def clients(trace: Trace, target: str) -> RunResult:
        """The replay, from --client-procs processes (in a thread: it waits on them)."""
        return await asyncio.to_thread(replay_parallel, trace, target, a.client_procs, 600.0,
                                       60.0, a.vocab, a.seed, a.client_driver == "many")

    async def through_stack() -> tuple[dict, dict]:
        async with _stack(a) as (scheds, worker):
            target, metrics_url = scheds[0].health, worker.metrics_url

            def cpu() -> dict[str, float]:
                """CPU seconds so far: each scheduler, worker (serving), engine; not Redis."""
                engine = sum(map(procs.tree_cpu_seconds, procs.children(worker.proc.pid)))
                out = {f"scheduler{i or ''}": procs.cpu_seconds(s.proc.pid)
                       for i, s in enumerate(scheds)}
                return out | {"worker_serving": procs.cpu_seconds(worker.proc.pid),
                              "engine": engine}

            async def measured(trace: Trace) -> dict:
                before = await asyncio.to_thread(procs.step_totals, metrics_url)
                cpu0, t0 = cpu(), time.perf_counter()
                run = await clients(trace, target)
                wall, cpu1 = time.perf_counter() - t0, cpu()
                after = await asyncio.to_thread(procs.step_totals, metrics_url)
                run.meta["engine_steps"] = procs.step_delta(before, after)
                # cores each process kept busy over the run: one near 1.0 set the pace
                run.meta["cpu_cores"] = {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in cpu1}
                return _summary(run)
            await replay(offline_trace(min(8, a.requests), a.prompt, 8), target)    # warm-up
            return await measured(offline), await measured(moderate)
    stack_off, stack_mod = asyncio.run(through_stack())
    return {
        "what": "sidecar cost: engine in-process vs client->gRPC->scheduler->Redis->worker",
        "machine": _machine(a.device), "model": a.model, "requests": a.requests,
        "prompt": a.prompt, "output": a.output, "moderate_rps": round(rate, 3),
        "client_processes": a.client_procs, "client_driver": a.client_driver,
        "schedulers": a.schedulers,
        "throughput_ratio": round(stack_off["output_tok_s"] / direct_off["output_tok_s"], 4),
        "added_at_moderate_load": _added(direct_mod, stack_mod),
        "runs": {"direct_offline": direct_off, "stack_offline": stack_off,
                 "direct_moderate": direct_mod, "stack_moderate": stack_mod}}


def _empty_cache() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _machine(device: str) -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if device != "cpu" and torch.cuda.is_available() else "cpu"
    return f"{platform.node()}: {gpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--output", type=int, default=256)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--load", type=float, default=0.5, help="moderate load, x offline req/s")
    p.add_argument("--schedulers", type=int, default=1,
                   help="scheduler processes sharing the gRPC port and the Redis queue")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes the whole path's requests are dealt to (one Python "
                        "process receiving every stream can set the pace itself)")
    p.add_argument("--client-driver", choices=("sdk", "many"), default="sdk",
                   help="each client process sends a Generate call per request (sdk) or all its "
                        "requests over one GenerateMany call (many)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON here")
    a = p.parse_args(argv)
    res = run(a)
    print(f"{res['machine']}\nmodel {a.model}: throughput ratio (whole path / in-process) "
          f"{res['throughput_ratio']:.3f}; at {res['moderate_rps']} req/s added TTFT p50/p99 "
          f"{res['added_at_moderate_load']['ttft_ms']['p50']}/{res['added_at_moderate_load']['ttft_ms']['p99']} ms, "
          f"TPOT p50/p99 {res['added_at_moderate_load']['tpot_ms']['p50']}/{res['added_at_moderate_load']['tpot_ms']['p99']} ms")
    for name, r in res["runs"].items():
        print(f"  {name:16s} engine steps: " + ", ".join(
            f"{k} {v['steps']} x {v['mean_ms']} ms" if v["steps"] else f"{k} {v['seconds']} s"
            for k, v in r["meta"]["engine_steps"].items())
            + (f"; CPU cores {r['meta']['cpu_cores']}" if "cpu_cores" in r["meta"] else ""))
        for hop, q in r.get("hops_ms", {}).items():
            print(f"    {hop:22s} p50 {q['p50']:8.2f}  p99 {q['p99']:8.2f}  max {q['max']:8.2f} ms")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
