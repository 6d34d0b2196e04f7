"""What the worker's serving loop costs per engine step, on CPU (no GPU needed; issue 9).

    python -m dynabatch.bench.worker_overhead --repeats 5 --out bench/results/worker_overhead_cpu.json

The engine is the fake engine with a GIL-free wait per step (`--step-ms`, standing in for the
GPU: time.sleep releases the GIL as a CUDA sync does) on top of its own per-sequence Python
(admission, one output per sequence: ~0.2-0.5 ms at batch 256, like a real engine's input
staging and sampling bookkeeping). One workload, two paths, run alternately (a noisy machine
shifts both the same way):
  alone   the engine stepped in this process, nothing else running
  worker  `dynabatch worker --engine fake` as its own process against real Redis (a private key
          prefix, deleted afterwards); this process plays the scheduler: it submits and assigns
          the requests through the queue and reads the token deltas back, checking that each
          request's tokens arrive in order, none lost or repeated
Per-step time = wall time / engine steps (the worker's own step counter, from its feedback).
CPU per step (from /proc, so it holds on a busy machine where wall times do not): the engine
alone; the worker's processes (its engine process, if any, counted separately). A machine with
fewer free cores than busy processes (worker, engine, Redis, this driver) turns CPU into wall
time, so read both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dynabatch.bench import procs
from dynabatch.v1.worker_pb2 import WorkItem


def run_alone(a: argparse.Namespace) -> dict:
    """The engine stepped back to back in this process (the ceiling)."""
    from dynabatch.worker_svc.engine.api import SequenceRequest
    from dynabatch.worker_svc.fake_engine import FakeEngine
    engine = FakeEngine(max_running=a.max_running, step_delay_s=a.step_ms / 1000)
    for i in range(a.requests):
        engine.add(SequenceRequest(f"a{i}", [1] * a.prompt, a.output, ignore_eos=True))
    tokens, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while engine.has_work():
        tokens += sum(len(o.token_ids) for o in engine.step())
    wall = time.perf_counter() - t0
    return _row("alone", wall, engine.stats().steps, tokens, time.process_time() - cpu0)


def _row(path: str, wall: float, steps: int, tokens: int, cpu_s: float,
         engine_cpu_s: float = 0.0) -> dict:
    per = 1000 / max(1, steps)
    return {"path": path, "wall_s": round(wall, 4), "steps": steps, "tokens": tokens,
            "step_ms": round(wall * per, 4), "tok_s": round(tokens / wall, 1),
            "cpu_ms_per_step": round(cpu_s * per, 4),
            "engine_proc_cpu_ms_per_step": round(engine_cpu_s * per, 4)}


def _worker_cpu(pid: int) -> tuple[float, float]:
    """(the worker process, its child processes) CPU seconds so far."""
    return procs.cpu_seconds(pid), sum(map(procs.tree_cpu_seconds, procs.children(pid)))


def _item(i: int, a: argparse.Namespace, run: int) -> WorkItem:
    return WorkItem(request_id=f"b{run}-{i}", model=a.model, prompt_token_ids=[1] * a.prompt,
                    max_tokens=a.output, ignore_eos=True, scheduler_id="bench",
                    arrival_unix_ns=time.time_ns())


async def _feedback(queue, worker_id: str, newer_than_ns: int = 0, timeout_s: float = 30):
    """The worker's latest feedback, once it is newer than `newer_than_ns`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for fb in await queue.workers():
            if fb.worker_id == worker_id and fb.unix_ns > newer_than_ns:
                return fb
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no feedback from {worker_id}")


async def run_worker_path(a: argparse.Namespace, queue, worker_id: str, run: int,
                          pid: int) -> dict:
    """Submit and assign the whole workload at once, read every delta back; check order."""
    before = await _feedback(queue, worker_id)
    cpu0 = _worker_cpu(pid)
    items = [_item(i, a, run) for i in range(a.requests)]
    for item in items:
        await queue.submit(item)
    got = {it.request_id: 0 for it in items}
    done, tokens = 0, 0
    t0 = time.perf_counter()
    moved = await queue.assign(worker_id, items)
    assert len(moved) == len(items), "assignment refused (worker not alive?)"
    deadline = time.monotonic() + a.timeout_s
    while done < len(items):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done}/{len(items)} requests finished")
        for batch in await queue.read_deltas("bench", 0.05):
            for d in batch.deltas:
                if d.offset != got[d.request_id]:
                    raise AssertionError(f"{d.request_id}: offset {d.offset}, "
                                         f"expected {got[d.request_id]} (a gap or a repeat)")
                got[d.request_id] += len(d.token_ids)
                tokens += len(d.token_ids)
                if d.finish_reason:
                    done += 1
                    if d.error:
                        raise AssertionError(f"{d.request_id}: {d.error}")
    wall = time.perf_counter() - t0
    cpu1 = _worker_cpu(pid)
    for it in items:
        await queue.finish(it.request_id)
    assert all(n == a.output for n in got.values()), "a request ended short"
    after = await _feedback(queue, worker_id, newer_than_ns=time.time_ns())
    return _row("worker", wall, after.steps - before.steps, tokens,
                cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1], cpu1[1] - cpu0[1])


async def run_all(a: argparse.Namespace) -> list[dict]:
    from dynabatch.wire.redis_queue import RedisQueue
    prefix = f"dynabatch-overhead-{os.getpid()}:"
    worker_id = f"bench-worker-{os.getpid()}"
    extra = ["--fake-step-delay-ms", str(a.step_ms), "--worker-id", worker_id]
    rows: list[dict] = []
    queue = RedisQueue(a.redis_url, prefix=prefix)
    try:
        async with procs.worker(a.redis_url, prefix, a.model, "cpu", a.max_running,
                                engine="fake", extra=extra) as worker:
            pid = worker.proc.pid
            run_alone(a)                                           # warm-up, both paths
            await run_worker_path(a, queue, worker_id, -1, pid)
            for r in range(a.repeats):
                rows.append(run_alone(a))
                rows.append(await run_worker_path(a, queue, worker_id, r, pid))
                al, w = rows[-2], rows[-1]
                print(f"  run {r}: alone {al['step_ms']:.3f} ms/step ({al['cpu_ms_per_step']:.3f}"
                      f" CPU), worker {w['step_ms']:.3f} ms/step ({w['cpu_ms_per_step']:.3f} CPU,"
                      f" engine process {w['engine_proc_cpu_ms_per_step']:.3f})", file=sys.stderr)
    finally:
        await queue.close()
        procs.drop_keys(a.redis_url, prefix)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for path in ("alone", "worker"):
        ms = [r["step_ms"] for r in rows if r["path"] == path]
        tok = [r["tok_s"] for r in rows if r["path"] == path]
        cpu = [r["cpu_ms_per_step"] for r in rows if r["path"] == path]
        eng = [r["engine_proc_cpu_ms_per_step"] for r in rows if r["path"] == path]
        out[path] = {"step_ms_median": round(statistics.median(ms), 3),
                     "step_ms_min": round(min(ms), 3), "tok_s_median": round(statistics.median(tok)),
                     "cpu_ms_per_step_median": round(statistics.median(cpu), 3),
                     "engine_proc_cpu_ms_per_step_median": round(statistics.median(eng), 3)}
    pairs = [w["tok_s"] / al["tok_s"] for al, w in zip(rows[::2], rows[1::2])]
    out["ratio_median"] = round(statistics.median(pairs), 4)
    out["added_ms_per_step_median"] = round(out["worker"]["step_ms_median"]
                                            - out["alone"]["step_ms_median"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--output", type=int, default=256)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=3.7, help="GIL-free wait per engine step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout-s", type=float, default=120)
    p.add_argument("--label", default="", help="what code ran (e.g. a commit)")
    p.add_argument("--out", help="write the JSON here")
    a = p.parse_args(argv)
    rows = asyncio.run(run_all(a))
    s = summary(rows)
    print(f"{platform.node()}, {os.cpu_count()} cpus; {a.requests} requests x {a.output} tokens, "
          f"batch {a.max_running}, step wait {a.step_ms} ms, {a.repeats} alternating runs")
    print("| path | ms/step (median) | ms/step (min) | tok/s (median) | CPU ms/step, all | "
          "of which engine process |\n|---|---:|---:|---:|---:|---:|")
    for path in ("alone", "worker"):
        r = s[path]
        print(f"| {path} | {r['step_ms_median']:.3f} | {r['step_ms_min']:.3f} | "
              f"{r['tok_s_median']:,} | {r['cpu_ms_per_step_median']:.3f} | "
              f"{r['engine_proc_cpu_ms_per_step_median']:.3f} |")
    print(f"worker/alone throughput ratio (median of pairs): {s['ratio_median']:.3f}; "
          f"added per step: {s['added_ms_per_step_median']:.3f} ms")
    if a.out:
        res = {"what": "worker serving overhead per engine step (fake engine, CPU)",
               "machine": f"{platform.node()}: {os.cpu_count()} cpus, {platform.python_version()}",
               "label": a.label, "args": vars(a), "summary": s, "runs": rows}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
