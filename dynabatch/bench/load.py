"""Load benchmark of the serving path itself (not a timed test): sustained streaming load on the
local stack with the fake engine. Reports admissions/s, streamed tokens/s and the CPU the stack
processes used (scheduler + in-process fake workers on the in-process queue, or the schedulers
alone with --redis-url, the worker then running as a separate process). The load generator (the
client processes) runs on the same machine: its CPU is reported too, and counts against it.

    python -m dynabatch.bench.load --seconds 15 --json bench/results/load_cpu.json
Two phases: `admissions` (many short requests: admission + queue + relay per request) and
`streaming` (long requests: token relay throughput).

`--driver many` sends each client connection's requests over one GenerateMany call (the SDK's
`client.many()`), so gRPC's per-call cost is paid once per connection, not per request.
`--driver h2load` replaces the Python SDK load generator (0.7-1 core of the same machine) with
nghttp2's h2load, in C (bench/h2load.py); the stack's own counters (requests completed /
rejected / failed) are read before and after each phase and must agree with it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from dynabatch.bench import h2load
from dynabatch.bench.procs import tree_cpu_seconds
from dynabatch.client import AsyncDynabatchClient, DynabatchError, ResourceExhausted


async def _serve(workers: int, max_running: int, port: int) -> None:
    from dynabatch.cli.stack import LocalStack, StackConfig
    from dynabatch.scheduler_svc.policy import PolicyConfig
    cfg = StackConfig(engine="fake", workers=workers, policy="fcfs",
                      policy_config=PolicyConfig(max_num_seqs=max_running, b_max=max_running),
                      engine_options={"max_running": max_running, "num_kv_blocks": 1 << 24})
    stack = LocalStack(cfg)
    # port > 0: join a stack already listening there (gRPC servers set SO_REUSEPORT; the
    # kernel spreads new connections over the processes)
    stack.scheduler.cfg.listen = f"127.0.0.1:{port}"
    async with stack:
        print(stack.scheduler.port, flush=True)
        sched = stack.scheduler
        await _answer_counts(lambda: {**sched.table.counts,
                                      "tokens": sched.telemetry.metrics.output_total})


async def _answer_counts(counts: Callable[[], dict[str, int]]) -> None:
    """Serve process side of `_pipe_counts`: every line read on stdin is answered with the
    server's request counters and output tokens relayed (a JSON line on stdout). Returns when
    stdin closes (the benchmark is gone)."""
    loop, closed = asyncio.get_running_loop(), asyncio.Event()

    def answer() -> None:
        if sys.stdin.readline():
            print(json.dumps(counts()), flush=True)
        else:
            loop.remove_reader(sys.stdin.fileno())
            closed.set()
    loop.add_reader(sys.stdin.fileno(), answer)
    await closed.wait()


async def _serve_floor(port: int) -> None:
    """gRPC alone: a Generate that answers at once (all tokens in one message), no queue, no
    worker. What the same client load gets from a server doing nothing is the ceiling of the
    real stack on this machine."""
    import grpc

    from dynabatch.v1 import scheduler_pb2 as pb
    from dynabatch.v1 import scheduler_pb2_grpc

    counts = {"completed": 0, "rejected": 0, "cancelled": 0, "failed": 0, "tokens": 0}

    class Floor(scheduler_pb2_grpc.SchedulerServicer):
        async def Generate(self, request, context):
            counts["completed"] += 1
            counts["tokens"] += request.max_tokens
            yield pb.GenerateResponse(request_id=request.request_id, offset=0,
                                      token_ids=[1] * request.max_tokens,
                                      finish_reason=pb.FINISH_REASON_LENGTH)

    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(Floor(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(port, flush=True)
    await _answer_counts(lambda: counts)


async def _drive(target: str, seconds: float, concurrency: int, max_tokens: int,
                 channels: int, many: bool) -> dict:
    counts = {"admitted": 0, "completed": 0, "tokens": 0, "rejected": 0, "errors": 0}
    end = time.monotonic() + seconds

    async def one_stream(client) -> None:     # a client, or a GenerateMany call
        while time.monotonic() < end:
            first = True
            try:
                async for msg in client.stream(prompt_token_ids=[1, 2, 3, 4], max_tokens=max_tokens,
                                               ignore_eos=True, skip_text=True):
                    counts["admitted"] += first
                    first = False
                    counts["tokens"] += len(msg.token_ids)
                counts["completed"] += 1
            except ResourceExhausted as e:
                counts["rejected"] += 1
                await asyncio.sleep(e.retry_after_s or 0.01)
            except DynabatchError:
                counts["errors"] += 1

    # each channel its own connection (no shared subchannel): with several stacks on one port,
    # the kernel balances connections, not calls
    clients = [AsyncDynabatchClient(target, timeout=seconds + 30,
                                    options=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(channels)]
    if not many:
        await asyncio.gather(*(one_stream(clients[i % channels]) for i in range(concurrency)))
    else:       # one GenerateMany call per connection, carrying its share of the streams
        async with contextlib.AsyncExitStack() as stack:
            calls = [await stack.enter_async_context(client.many()) for client in clients]
            await asyncio.gather(*(one_stream(calls[i % channels]) for i in range(concurrency)))
    for client in clients:
        await client.close()
    return counts


def _driver_process(target, seconds, concurrency, max_tokens, channels, many, out) -> None:
    counts = asyncio.run(_drive(target, seconds, concurrency, max_tokens, channels, many))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put({**counts, "client_cpu_s": usage.ru_utime + usage.ru_stime})


Counts = h2load.Counts


def phase(target: str, pids: list[int], name: str, seconds: float, procs: int, concurrency: int,
          max_tokens: int, channels: int = 1, driver: str = "sdk",
          counters: Callable[[], Counts] | None = None) -> dict:
    """Drive load for `seconds`; stack CPU is that of `pids` together. `counters` reads the
    stacks' request counters (summed): their change over the phase is reported, and with
    h2load checked against what h2load saw."""
    c0 = counters() if counters else None
    cpu0, t0 = sum(map(tree_cpu_seconds, pids)), time.monotonic()
    if driver == "h2load":
        # one h2load thread per client process, all of them in one h2load
        concurrency, channels = concurrency * procs, channels * procs
        total = h2load.run(target, seconds, concurrency, max_tokens, channels, procs)
    else:
        total = _sdk(target, seconds, procs, concurrency, max_tokens, channels, driver == "many")
    wall, cpu = time.monotonic() - t0, sum(map(tree_cpu_seconds, pids)) - cpu0
    server = None
    if counters and c0 is not None:
        c1 = counters()
        server = {k: c1[k] - c0[k] for k in c1}
    if driver == "h2load":
        if server is None:
            raise RuntimeError("--driver h2load needs the stack's counters to check its results")
        h2load.check(total, server, concurrency)
        # tokens: relayed by the stack (as the SDK driver counts those it received, streams
        # cut at the end included); h2load sees only bytes
        total.update(admitted=total["h2load_succeeded"], completed=total["h2load_succeeded"],
                     tokens=server.get("tokens", total["h2load_succeeded"] * max_tokens))
    return {"phase": name, "driver": driver, "seconds": round(wall, 2), "client_processes": procs,
            "streams_per_process": concurrency, "channels_per_process": channels,
            "max_tokens": max_tokens, **total, "stack_counts": server,
            "admissions_per_s": round(total["admitted"] / wall), "tokens_per_s": round(total["tokens"] / wall),
            "stack_cpu_cores": round(cpu / wall, 2),
            "client_cpu_cores": round(total["client_cpu_s"] / wall, 2)}


def _sdk(target: str, seconds: float, procs: int, concurrency: int, max_tokens: int,
         channels: int, many: bool) -> dict:
    out: mp.Queue = mp.Queue()
    drivers = [mp.Process(target=_driver_process,
                          args=(target, seconds, concurrency, max_tokens, channels, many, out))
               for _ in range(procs)]
    for d in drivers:
        d.start()
    results = [out.get() for _ in drivers]
    for d in drivers:
        d.join()
    return {k: sum(r[k] for r in results) for k in results[0]}


def _pinned(cpus: set[int] | None):
    """A Popen preexec_fn that pins the child to `cpus` (None: the parent's CPUs)."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def _in_process(workers: int, max_running: int, floor: bool, processes: int,
                cpus: set[int] | None) -> tuple[list[subprocess.Popen], str]:
    """Independent stack processes (each its own in-process queue and fake workers) listening
    on one port."""
    procs, port = [], 0
    for _ in range(processes):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dynabatch.bench.load", "--serve", "--port", str(port),
             "--workers", str(workers), "--max-running", str(max_running),
             *(["--floor"] if floor else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, preexec_fn=_pinned(cpus)))
        port = int(procs[-1].stdout.readline())
    return procs, f"127.0.0.1:{port}"


def _pipe_counts(procs: list[subprocess.Popen]) -> Callable[[], Counts]:
    """The request counters of in-process stacks, summed (each asked over its stdin)."""
    def read() -> Counts:
        for proc in procs:
            proc.stdin.write("\n")
            proc.stdin.flush()
        rows = [json.loads(proc.stdout.readline()) for proc in procs]
        return {k: sum(r[k] for r in rows) for k in rows[0]}
    return read


def _stats_counts(target: str) -> Counts:
    """One scheduler's request counters, from GetStats."""
    async def get() -> Counts:
        async with AsyncDynabatchClient(target, timeout=5) as client:
            s = await client.stats()
        return {"completed": s.completed, "rejected": s.rejected, "cancelled": s.cancelled,
                "failed": s.failed}     # no output token count in GetStats
    return asyncio.run(get())


def _prefix() -> str:
    return f"dynabatch-load-{os.getpid()}:"


async def _purge(redis_url: str) -> None:
    from dynabatch.wire.redis_queue import RedisQueue
    queue = RedisQueue(redis_url, _prefix())
    await queue.purge()
    await queue.close()


def _separate(redis_url: str, max_running: int, schedulers: int,
              cpus: set[int] | None) -> tuple[list[subprocess.Popen], str]:
    """Schedulers (first: their CPU is measured) sharing one listen port, and one fake worker,
    as separate processes."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = _prefix()
    cli = [sys.executable, "-m", "dynabatch.cli"]
    common = ["--redis-url", redis_url, "--redis-prefix", prefix, "--log-level", "WARNING",
              "--metrics-port", "0"]
    scheds = [subprocess.Popen([*cli, "scheduler", *common, "--listen", f"127.0.0.1:{port}",
                                "--policy", "fcfs", "--policy-opt", f"max_num_seqs={max_running}",
                                "--policy-opt", f"b_max={max_running}"],
                               preexec_fn=_pinned(cpus))
              for _ in range(schedulers)]
    worker = subprocess.Popen([*cli, "worker", *common, "--engine", "fake", "--max-running",
                               str(max_running), "--health-listen", "127.0.0.1:0"])
    target = f"127.0.0.1:{port}"
    asyncio.run(_until_serving(target))
    return [*scheds, worker], target


async def _until_serving(target: str, timeout_s: float = 60) -> None:
    async with AsyncDynabatchClient(target, timeout=5) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if (await client.stats()).workers:
                    return
            except DynabatchError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the scheduler did not come up")
            await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="in-process fake workers")
    p.add_argument("--max-running", type=int, default=512)
    p.add_argument("--redis-url", help="run `dynabatch scheduler` and `dynabatch worker --engine "
                   "fake` as separate processes meeting in this Redis; CPU is the scheduler's alone")
    p.add_argument("--processes", type=int, default=1,
                   help="server processes sharing one listen port (SO_REUSEPORT): whole stacks "
                        "(each its own in-process queue and fake workers), or with --redis-url "
                        "schedulers sharing the queue")
    p.add_argument("--channels", type=int, default=1,
                   help="gRPC connections per client process (the kernel spreads connections, "
                        "not calls, over --processes)")
    p.add_argument("--stack-cpus", type=lambda v: {int(c) for c in v.split(",")},
                   help="pin the server processes to these CPUs, e.g. 0,1 (the client processes "
                        "keep this process's CPUs: run it under taskset to keep them apart)")
    p.add_argument("--floor", action="store_true",
                   help="admissions against a gRPC server that does nothing (the ceiling)")
    p.add_argument("--driver", choices=("sdk", "many", "h2load"), default="sdk",
                   help="load generator: the Python SDK (client processes; a Generate call per "
                        "request), the SDK's GenerateMany (one call per --channels connection "
                        "carries all its requests), or nghttp2's h2load (C, one process, one "
                        "thread per --client-procs, --channels connections per thread; apt-get "
                        "install nghttp2-client)")
    p.add_argument("--streams", type=int, default=256,
                   help="concurrent streams per client process (each runs requests back to back)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve_floor(args.port) if args.floor
                    else _serve(args.workers, args.max_running, args.port))
        return 0
    if args.driver == "many" and args.floor:
        raise SystemExit("--floor answers Generate only: use --driver sdk or h2load with it")
    if args.driver == "h2load" and not shutil.which("h2load"):
        raise SystemExit(h2load.H2LOAD_MISSING)
    if args.driver == "h2load" and args.redis_url and args.processes > 1:
        raise SystemExit("--driver h2load checks its results against the scheduler's counters "
                         "(GetStats): with --redis-url, one scheduler process only")
    load0 = os.getloadavg()
    procs, target = (
        _separate(args.redis_url, args.max_running, args.processes, args.stack_cpus)
        if args.redis_url else
        _in_process(args.workers, args.max_running, args.floor, args.processes, args.stack_cpus))
    pids = [p.pid for p in procs[:args.processes]]      # not the separate worker's
    counters = (None if args.redis_url and args.processes > 1 else
                (lambda: _stats_counts(target)) if args.redis_url else _pipe_counts(procs))
    run = [("admissions", 1)] + ([] if args.floor else [("streaming", 2000)])
    try:
        phases = [phase(target, pids, name, args.seconds, args.client_procs, args.streams, tokens,
                        args.channels, args.driver, counters) for name, tokens in run]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if args.redis_url:
            asyncio.run(_purge(args.redis_url))
    result = {"command": "python -m dynabatch.bench.load " + " ".join(argv or sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)),
                          "cpu": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "loadavg_1m_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
              "phases": phases}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
