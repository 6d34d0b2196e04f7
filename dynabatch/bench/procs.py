"""The deployed stack as child processes, for benchmarks that measure the real path.

`dynabatch scheduler` and `dynabatch worker` run exactly as in a deployment (separate processes,
sharing a Redis key prefix); each is an async context manager that waits until the process's
gRPC health service says SERVING and stops it on exit (SIGTERM, then SIGKILL after a grace).
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

_CLI = [sys.executable, "-m", "dynabatch.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen | None = None,
                       name: str = "process") -> None:
    """Poll grpc.health on `target` until SERVING; fail at once if `proc` exits meanwhile."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} before serving")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{name} at {target} not SERVING after {timeout_s:.0f} s")


class Child:
    """One `dynabatch ...` child process, SERVING on `health` between enter and exit."""

    def __init__(self, name: str, args: list[str], health: str, startup_s: float) -> None:
        self.name, self.cmd, self.health, self.startup_s = name, _CLI + args, health, startup_s
        self.proc: subprocess.Popen | None = None
        self.metrics_url: str | None = None

    async def __aenter__(self) -> "Child":
        self.proc = subprocess.Popen(self.cmd)
        try:
            await wait_serving(self.health, self.startup_s, self.proc, self.name)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (of all its threads)."""
    try:
        return [int(c) for task in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except OSError:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of `pid` and of its live descendants (a worker runs its engine in a child
    process: that is the worker's CPU too)."""
    return cpu_seconds(pid) + sum(map(tree_cpu_seconds, children(pid)))


def drop_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix` (a benchmark's own namespace) once its processes are gone."""
    import redis
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)
    client.close()


def _common(redis_url: str, prefix: str) -> list[str]:
    return ["--redis-url", redis_url, "--redis-prefix", prefix, "--log-level", "WARNING"]


def scheduler(redis_url: str, prefix: str, model: str, policy: str,
              policy_opts: list[str] = (), listen: str | None = None) -> Child:
    """`dynabatch scheduler`; its gRPC address is `child.health` (health shares the port).
    `listen`: an address another scheduler already serves (gRPC servers set SO_REUSEPORT, so
    the kernel spreads new connections over the processes on one port)."""
    addr = listen or f"127.0.0.1:{free_port()}"
    opts = [x for o in policy_opts for x in ("--policy-opt", o)]
    return Child(f"scheduler ({policy})", ["scheduler", *_common(redis_url, prefix), "--listen",
                                           addr, "--model", model, "--policy", policy, *opts],
                 addr, 60)


def worker(redis_url: str, prefix: str, model: str, device: str, max_running: int,
           kv_blocks: int | None = None, engine: str = "torch", extra: list[str] = ()) -> Child:
    """`dynabatch worker`; start-up includes model load and CUDA-graph capture. `extra`: more
    worker flags (e.g. the fake engine's)."""
    health, metrics = f"127.0.0.1:{free_port()}", free_port()
    kv = ["--kv-blocks", str(kv_blocks)] if kv_blocks else []
    child = Child("worker", ["worker", *_common(redis_url, prefix), "--model", model, "--engine",
                             engine, "--device", device, "--max-running", str(max_running), *kv,
                             "--health-listen", health, "--metrics-port", str(metrics), *extra],
                  health, 600)
    child.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
    return child


def step_totals(metrics_url: str) -> dict[str, dict[str, float]]:
    """A worker's engine steps so far by kind: {kind: {"steps": n, "seconds": total}} (from
    its dynabatch_worker_step_duration_seconds histogram), and under "stalled" the time its
    engine waited for the serving process (dynabatch_worker_engine_stalled_seconds), under
    "gaps" the time between its back-to-back steps (dynabatch_worker_engine_gap_seconds)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families
    with urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    step = "dynabatch_worker_step_duration_seconds"
    waits = {"dynabatch_worker_engine_stalled_seconds_total": "stalled",
             "dynabatch_worker_engine_gap_seconds_total": "gaps"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = {step + "_count": "steps", step + "_sum": "seconds"}.get(sample.name)
            if field:
                out.setdefault(sample.labels["kind"], {})[field] = sample.value
            elif sample.name in waits:
                out[waits[sample.name]] = {"seconds": sample.value}
    return out


def step_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """step_totals between two scrapes, with each kind's mean step in ms."""
    out = {}
    for kind, now in after.items():
        was = before.get(kind, {})
        n = now.get("steps", 0) - was.get("steps", 0)
        secs = now.get("seconds", 0) - was.get("seconds", 0)
        out[kind] = {"steps": int(n), "seconds": round(secs, 4),
                     "mean_ms": round(1e3 * secs / n, 3) if n else None}
    return out
