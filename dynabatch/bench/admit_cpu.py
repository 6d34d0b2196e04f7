"""CPU per admission of the scheduler stack without gRPC (a micro-benchmark, not a timed test).

The load benchmark's stack (bench/load.py: scheduler, policy fcfs, in-process queue, one fake
worker whose engine runs in a thread) is built here, and Generate is called on the servicer
directly with a stub context, by `--concurrency` tasks, each running requests of `--max-tokens`
tokens back to back. What it reports is the process's CPU time (every thread: the engine's
too) per completed request, the part of the stack's cost that is dynabatch's own and not
gRPC's:

    python -m dynabatch.bench.admit_cpu --requests 20000 --repeat 5
`--client-ids` sends a request id (the SDK's path); by default the scheduler assigns one and
sends it as initial metadata (h2load's path; the stub context's send is free here).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time

import grpc

from dynabatch.cli.stack import LocalStack, StackConfig
from dynabatch.scheduler_svc.policy import PolicyConfig
from dynabatch.v1 import scheduler_pb2 as pb


class StubContext:
    """The part of grpc.aio.ServicerContext the servicer uses; sends and aborts cost nothing."""

    def __init__(self, written: list[int] | None = None) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._written = written if written is not None else [0]

    async def write(self, message) -> None:
        self._written[0] += 1

    async def send_initial_metadata(self, metadata) -> None:
        return None

    def set_trailing_metadata(self, metadata) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        raise grpc.aio.AbortError(f"{code}: {details}")

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details


async def _round(stack: LocalStack, requests: int, concurrency: int, max_tokens: int,
                 ids: itertools.count | None) -> dict:
    """`requests` requests through the servicer; CPU and wall time of this process."""
    service = stack.scheduler.service
    left = [requests]
    done = [0]                             # completed
    messages = [0]

    async def one_stream() -> None:
        while left[0] > 0:
            left[0] -= 1
            req = pb.GenerateRequest(prompt_token_ids=[1, 2, 3, 4], max_tokens=max_tokens,
                                     ignore_eos=True, skip_text=True)
            if ids is not None:
                req.request_id = f"r{next(ids)}"
            await service.Generate(req, StubContext(messages))
            done[0] += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one_stream() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"completed": done[0], "messages": messages[0], "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3), "cpu_us_per_request": round(cpu / done[0] * 1e6, 1)}


async def run(requests: int, repeat: int, concurrency: int, max_tokens: int,
              client_ids: bool, max_running: int = 512) -> dict:
    cfg = StackConfig(engine="fake", workers=1, policy="fcfs",
                      policy_config=PolicyConfig(max_num_seqs=max_running, b_max=max_running),
                      engine_options={"max_running": max_running, "num_kv_blocks": 1 << 24})
    ids = itertools.count() if client_ids else None
    async with LocalStack(cfg) as stack:
        while not stack.scheduler.batching.workers:      # the worker's first heartbeat
            await asyncio.sleep(0.05)
        await _round(stack, min(requests, 2000), concurrency, max_tokens, ids)     # warm-up
        rounds = [await _round(stack, requests, concurrency, max_tokens, ids)
                  for _ in range(repeat)]
    per = [r["cpu_us_per_request"] for r in rounds]
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
            "client_ids": client_ids, "rounds": rounds, "best_us": min(per),
            "median_us": statistics.median(per)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000, help="per round")
    p.add_argument("--repeat", type=int, default=5, help="rounds (best and median reported)")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--client-ids", action="store_true", help="requests carry their own id")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.requests, args.repeat, args.concurrency, args.max_tokens,
                             args.client_ids))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
