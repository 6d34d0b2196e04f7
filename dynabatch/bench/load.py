"""Load benchmark of the serving path itself (not a timed test): sustained streaming load on the
local stack with the fake engine. Reports admissions/s, streamed tokens/s and the CPU the stack
process used (scheduler + in-process fake workers on the in-process queue, or the scheduler
alone with --redis-url, workers then running as separate processes).

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


async def _serve(workers: int, max_running: int) -> None:
    from dynabatch.cli.stack import LocalStack, StackConfig
    from dynabatch.scheduler_svc.policy import PolicyConfig
    cfg = StackConfig(engine="fake", workers=workers, policy="fcfs",
                      policy_config=PolicyConfig(max_num_seqs=max_running, b_max=max_running),
                      engine_options={"max_running": max_running, "num_kv_blocks": 1 << 24})
    async with LocalStack(cfg) as stack:
        print(stack.scheduler.port, flush=True)
        await asyncio.Event().wait()


async def _drive(target: str, seconds: float, concurrency: int, max_tokens: int) -> dict:
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

    async with AsyncDynabatchClient(target, timeout=seconds + 30) as client:
        await asyncio.gather(*(one_stream(client) for _ in range(concurrency)))
    return counts


def _driver_process(target, seconds, concurrency, max_tokens, out) -> None:
    counts = asyncio.run(_drive(target, seconds, concurrency, max_tokens))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put({**counts, "client_cpu_s": usage.ru_utime + usage.ru_stime})


def phase(target: str, pid: int, name: str, seconds: float, procs: int, concurrency: int,
          max_tokens: int) -> dict:
    out: mp.Queue = mp.Queue()
    drivers = [mp.Process(target=_driver_process, args=(target, seconds, concurrency, max_tokens, out))
               for _ in range(procs)]
    cpu0, t0 = _cpu_s(pid), time.monotonic()
    for d in drivers:
        d.start()
    results = [out.get() for _ in drivers]
    wall, cpu = time.monotonic() - t0, _cpu_s(pid) - cpu0
    for d in drivers:
        d.join()
    total = {k: sum(r[k] for r in results) for k in results[0]}
    return {"phase": name, "seconds": round(wall, 2), "client_processes": procs,
            "streams_per_process": concurrency, "max_tokens": max_tokens, **total,
            "admissions_per_s": round(total["admitted"] / wall), "tokens_per_s": round(total["tokens"] / wall),
            "stack_cpu_cores": round(cpu / wall, 2),
            "client_cpu_cores": round(total["client_cpu_s"] / wall, 2)}


def _in_process(workers: int, max_running: int) -> tuple[list[subprocess.Popen], str]:
    stack = subprocess.Popen([sys.executable, "-m", "dynabatch.bench.load", "--serve",
                              "--workers", str(workers), "--max-running", str(max_running)],
                             stdout=subprocess.PIPE, text=True)
    return [stack], f"127.0.0.1:{int(stack.stdout.readline())}"


def _separate(redis_url: str, max_running: int) -> tuple[list[subprocess.Popen], str]:
    """Scheduler (first: its CPU is measured) and one fake worker, as separate processes."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = f"dynabatch-load-{os.getpid()}:"
    cli = [sys.executable, "-m", "dynabatch.cli"]
    common = ["--redis-url", redis_url, "--redis-prefix", prefix, "--log-level", "WARNING"]
    sched = subprocess.Popen([*cli, "scheduler", *common, "--listen", f"127.0.0.1:{port}",
                              "--policy", "fcfs", "--policy-opt", f"max_num_seqs={max_running}",
                              "--policy-opt", f"b_max={max_running}"])
    worker = subprocess.Popen([*cli, "worker", *common, "--engine", "fake", "--max-running",
                               str(max_running), "--health-listen", "127.0.0.1:0"])
    target = f"127.0.0.1:{port}"
    asyncio.run(_until_serving(target))
    return [sched, worker], target


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
    p.add_argument("--json", help="write results here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.workers, args.max_running))
        return 0
    procs, target = (_separate(args.redis_url, args.max_running) if args.redis_url
                     else _in_process(args.workers, args.max_running))
    try:
        phases = [phase(target, procs[0].pid, "admissions", args.seconds, args.client_procs, 256, 1),
                  phase(target, procs[0].pid, "streaming", args.seconds, args.client_procs, 256, 2000)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    result = {"command": "python -m dynabatch.bench.load " + " ".join(argv or sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "phases": phases}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
