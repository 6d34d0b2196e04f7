"""Replay a trace against a running stack through the client SDK, open loop.

Arrivals follow the trace's timestamps and never wait for responses (each request is its own
task). Prompts are synthetic token ids of the trace's lengths; outputs are forced to the trace's
lengths (max_tokens = length, ignore_eos), as the trace's authors replayed it. Every time is
measured by this client (arrival = when the request was sent, first token and finish = when the
deltas arrived); queue time comes from the server's Timings. Batch size and KV usage over time
come from polling GetStats. The summary is metrics.summarize, the same as the simulator's.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import sys
import time
from pathlib import Path

from dynabatch.bench.metrics import Outcome, RequestRecord, RunResult, TimelineSample, summarize
from dynabatch.bench.traces import Trace
from dynabatch.v1 import scheduler_pb2 as pb


def prompt_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


async def _one(client, rec: RequestRecord, t0: float, vocab: int, rng: random.Random) -> None:
    from dynabatch.client import DeadlineExceeded, DynabatchError, ResourceExhausted
    ids = prompt_ids(rec.prompt_tokens, vocab, rng)
    loop = asyncio.get_running_loop()
    rec.arrival_s = loop.time() - t0
    received = 0
    try:
        async for delta in client.stream(
                prompt_token_ids=ids, max_tokens=rec.output_tokens, ignore_eos=True,
                ttft_target_ms=round(rec.ttft_target_s * 1000),
                tpot_target_ms=round(rec.tpot_target_s * 1000), skip_text=True):
            now = loop.time() - t0
            if delta.token_ids and rec.first_token_s < 0:
                rec.first_token_s = now
            received += len(delta.token_ids)
            if delta.finish_reason:
                rec.finish_s = now
                if delta.HasField("timings"):
                    _server_times(rec, delta.timings, t0 + time.time() - loop.time())
        rec.output_tokens = received
        rec.outcome = Outcome.OK if received and rec.finish_s >= 0 else Outcome.FAILED
    except ResourceExhausted:
        rec.outcome = Outcome.REJECTED
    except DeadlineExceeded:
        rec.outcome = Outcome.EXPIRED
    except DynabatchError:
        rec.outcome = Outcome.FAILED


def _server_times(rec: RequestRecord, t: pb.Timings, wall_t0: float) -> None:
    """The server's Timings on the record: its own intervals from the client's send, and its
    wall-clock moments on the client's clock (`wall_t0`: the trace's time 0 as Unix seconds)."""
    rec.assigned_s = rec.arrival_s + t.queue_ms / 1000
    rec.server_first_token_s = rec.arrival_s + t.ttft_ms / 1000
    at = lambda ns: ns / 1e9 - wall_t0 if ns else -1.0  # noqa: E731
    rec.server_arrival_s = at(t.arrival_unix_ns)
    rec.first_step_end_s = at(t.first_step_end_unix_ns)
    rec.first_relayed_s = at(t.first_token_unix_ns)
    if t.arrival_unix_ns:
        rec.last_relayed_s = rec.server_arrival_s + t.total_ms / 1000


async def _poll(client, t0: float, period_s: float, out: list[TimelineSample],
                stop: asyncio.Event) -> str:
    loop, policy = asyncio.get_running_loop(), ""
    while not stop.is_set():
        try:
            st = await client.stats()
            policy = st.policy
            for w in st.workers:
                total = max(w.kv_blocks_total, 1)
                out.append(TimelineSample(loop.time() - t0, w.worker_id, float(w.running),
                                          w.running, w.kv_blocks_used / total, st.waiting,
                                          w.engine_waiting, w.preemptions, w.decode_step_ms,
                                          w.step_prefill_tokens))
        except Exception:  # stats are best-effort; the requests are what is measured
            pass
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except TimeoutError:
            pass
    return policy


async def replay(trace: Trace, target: str, ttft_target_s: float = 2.0,
                 tpot_target_s: float = 0.05, vocab: int = 256, seed: int = 0,
                 stats_period_s: float = 0.25, start: float | None = None,
                 first_index: int = 0, step: int = 1, many: bool = False) -> RunResult:
    """`start`: the time.monotonic() at which the trace's time 0 falls (default: now), so that
    client processes replaying parts of one trace share a clock (replay_parallel); request i
    of `trace` is labelled r{first_index + i * step}. `many`: every request over one
    GenerateMany call (`client.many()`) instead of a Generate call each."""
    from dynabatch.client import AsyncDynabatchClient
    recs = [RequestRecord(f"r{first_index + i * step}", r.arrival_s, r.prompt_tokens,
                          r.output_tokens, ttft_target_s, tpot_target_s)
            for i, r in enumerate(trace.requests)]
    rng = random.Random(seed + first_index)
    timeline: list[TimelineSample] = []
    wall = time.perf_counter()
    async with AsyncDynabatchClient(target) as client, contextlib.AsyncExitStack() as calls:
        sender = await calls.enter_async_context(client.many()) if many else client
        loop = asyncio.get_running_loop()      # its clock is time.monotonic(), system-wide
        t0 = loop.time() if start is None else start
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll(client, t0, stats_period_s, timeline, stop))
        tasks = []
        for rec in recs:                      # open loop: sleep to each arrival, never await work
            delay = t0 + rec.arrival_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(sender, rec, t0, vocab, rng)))
        await asyncio.gather(*tasks)
        stop.set()
        policy = await poller
    meta = {"simulated": False, "target": target, "policy": policy, "trace": trace.source,
            "client_driver": "many" if many else "sdk",
            "trace_notes": trace.notes, "requests": len(recs),
            "wall_s": time.perf_counter() - wall,
            "client_host": f"{platform.node()} ({platform.machine()})",
            "server_counts": await _server_counts(target)}
    return RunResult(recs, timeline, label=policy or "replay", meta=meta)


def _replay_part(args: tuple) -> RunResult:
    part, target, kwargs = args
    return asyncio.run(replay(part, target, **kwargs))


def replay_parallel(trace: Trace, target: str, processes: int, ttft_target_s: float = 2.0,
                    tpot_target_s: float = 0.05, vocab: int = 256, seed: int = 0,
                    many: bool = False) -> RunResult:
    """replay() with the trace's requests dealt round-robin to `processes` client processes on
    one clock: when hundreds of streams run at once, one Python process's receive loop
    otherwise sets the pace (and its lag is counted as the server's). The timeline is the
    first process's; the server counts in meta are read after every process finished."""
    import concurrent.futures as cf
    import multiprocessing as mp
    if processes <= 1:
        return asyncio.run(replay(trace, target, ttft_target_s, tpot_target_s, vocab, seed,
                                  many=many))
    start = time.monotonic() + 2.0                  # every process connected by then
    jobs = [(Trace(trace.requests[i::processes], source=trace.source, notes=trace.notes), target,
             dict(ttft_target_s=ttft_target_s, tpot_target_s=tpot_target_s, vocab=vocab,
                  seed=seed, start=start, first_index=i, step=processes, many=many))
            for i in range(processes)]
    with cf.ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_replay_part, jobs))
    recs = sorted((r for p in parts for r in p.records), key=lambda r: int(r.request_id[1:]))
    meta = dict(parts[0].meta, requests=len(recs), client_processes=processes,
                wall_s=max(p.meta["wall_s"] for p in parts),
                server_counts=asyncio.run(_server_counts(target)))
    return RunResult(recs, parts[0].timeline, parts[0].label, meta)


async def _server_counts(target: str) -> dict:
    from dynabatch.client import AsyncDynabatchClient
    async with AsyncDynabatchClient(target) as client:
        st = await client.stats()
    return {"completed": st.completed, "rejected": st.rejected, "failed": st.failed,
            "cancelled": st.cancelled}


def main(a: argparse.Namespace, trace: Trace) -> int:
    """`dynabatch bench replay` (argument parsing lives in commands.py)."""
    try:
        import dynabatch.client  # noqa: F401
    except ImportError as e:
        print(f"error: the client SDK is not available ({e})", file=sys.stderr)
        return 2
    print(trace.describe(), file=sys.stderr)
    run = asyncio.run(replay(trace, a.target, a.ttft_ms / 1000, a.tpot_ms / 1000, a.vocab,
                             a.seed, many=a.driver == "many"))
    s = summarize(run)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(s, indent=1, default=str) + "\n")
    if a.json:
        print(json.dumps(s, indent=1, default=str))
    else:
        print(f"replay (measured, {a.target}, policy {s['label']}): attainment "
              f"{100 * s['sla_attainment']:.1f}%  goodput {s['goodput_rps']:.2f}/s  throughput "
              f"{s['throughput_rps']:.2f}/s ({s['output_tok_s']:.0f} tok/s)  TTFT p50/p99 "
              f"{s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms  TPOT p50/p99 "
              f"{s['tpot_ms']['p50']:.1f}/{s['tpot_ms']['p99']:.1f} ms  counts {s['counts']}")
    return 0
