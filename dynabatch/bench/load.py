"""Load benchmark of the serving path itself (not a timed test): sustained streaming load on the
local stack with the fake engine. Reports admissions/s, streamed tokens/s and the CPU the stack
processes used (scheduler + in-process fake workers on the in-process queue, or the schedulers
alone with --redis-url, the worker then running as a separate process). The load generator (the
client processes) runs on the same machine: its CPU is reported too, and counts against it.

    python -m dynabatch.bench.load --seconds 15 --json bench/results/load_cpu.json
Two phases: `admissions` (many short requests: admission + queue + relay per request) and
`streaming` (long requests: token relay throughput).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time

from dynabatch.client import AsyncDynabatchClient, DynabatchError, ResourceExhausted


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        await asyncio.Event().wait()


async def _serve_floor(port: int) -> None:
    """gRPC alone: a Generate that answers at once (all tokens in one message), no queue, no
    worker. What the same client load gets from a server doing nothing is the ceiling of the
    real stack on this machine."""
    import grpc

    from dynabatch.v1 import scheduler_pb2 as pb
    from dynabatch.v1 import scheduler_pb2_grpc

    class Floor(scheduler_pb2_grpc.SchedulerServicer):
        async def Generate(self, request, context):
            yield pb.GenerateResponse(request_id=request.request_id, offset=0,
                                      token_ids=[1] * request.max_tokens,
                                      finish_reason=pb.FINISH_REASON_LENGTH)

    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(Floor(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _drive(target: str, seconds: float, concurrency: int, max_tokens: int,
                 channels: int) -> dict:
    counts = {"admitted": 0, "completed": 0, "tokens": 0, "rejected": 0, "errors": 0}
    end = time.monotonic() + seconds

    async def one_stream(client: AsyncDynabatchClient) -> None:
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
    await asyncio.gather(*(one_stream(clients[i % channels]) for i in range(concurrency)))
    for client in clients:
        await client.close()
    return counts


def _driver_process(target, seconds, concurrency, max_tokens, channels, out) -> None:
    counts = asyncio.run(_drive(target, seconds, concurrency, max_tokens, channels))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put({**counts, "client_cpu_s": usage.ru_utime + usage.ru_stime})


def phase(target: str, pids: list[int], name: str, seconds: float, procs: int, concurrency: int,
          max_tokens: int, channels: int = 1) -> dict:
    """Drive load for `seconds`; stack CPU is that of `pids` together."""
    out: mp.Queue = mp.Queue()
    drivers = [mp.Process(target=_driver_process,
                          args=(target, seconds, concurrency, max_tokens, channels, out))
               for _ in range(procs)]
    cpu0, t0 = sum(map(_cpu_s, pids)), time.monotonic()
    for d in drivers:
        d.start()
    results = [out.get() for _ in drivers]
    wall, cpu = time.monotonic() - t0, sum(map(_cpu_s, pids)) - cpu0
    for d in drivers:
        d.join()
    total = {k: sum(r[k] for r in results) for k in results[0]}
    return {"phase": name, "seconds": round(wall, 2), "client_processes": procs,
            "streams_per_process": concurrency, "channels_per_process": channels,
            "max_tokens": max_tokens, **total,
            "admissions_per_s": round(total["admitted"] / wall), "tokens_per_s": round(total["tokens"] / wall),
            "stack_cpu_cores": round(cpu / wall, 2),
            "client_cpu_cores": round(total["client_cpu_s"] / wall, 2)}


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
             *(["--floor"] if floor else [])], stdout=subprocess.PIPE, text=True,
            preexec_fn=_pinned(cpus)))
        port = int(procs[-1].stdout.readline())
    return procs, f"127.0.0.1:{port}"


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
    p.add_argument("--json", help="write results here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve_floor(args.port) if args.floor
                    else _serve(args.workers, args.max_running, args.port))
        return 0
    load0 = os.getloadavg()
    procs, target = (
        _separate(args.redis_url, args.max_running, args.processes, args.stack_cpus)
        if args.redis_url else
        _in_process(args.workers, args.max_running, args.floor, args.processes, args.stack_cpus))
    pids = [p.pid for p in procs[:args.processes]]      # not the separate worker's
    run = [("admissions", 1)] + ([] if args.floor else [("streaming", 2000)])
    try:
        phases = [phase(target, pids, name, args.seconds, args.client_procs, 256, tokens,
                        args.channels) for name, tokens in run]
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
