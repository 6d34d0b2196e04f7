"""Chaos test kit: processes the test starts and kills by PID, a private Redis, accounting.

Everything is loopback only and bounded in time; every process started here is killed at the
end of its test, by its own PID.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dynabatch.client import AsyncDynabatchClient, DynabatchError

MODEL = "tiny-random-llama"
VOCAB = 256          # the fake engine's: output token i of a prompt of length n is (n + i) % 256


def expected_tokens(prompt_len: int, n: int) -> list[int]:
    return [(prompt_len + i) % VOCAB for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Procs:
    """Starts `dynabatch ...` subprocesses; kills whatever is left (by PID) at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.started = tmp, []

    def start(self, name: str, *args: str, env: dict | None = None) -> Proc:
        log = self.tmp / f"{name}-{len(self.started)}.log"
        popen = subprocess.Popen([sys.executable, "-m", "dynabatch.cli", *args],
                                 stdout=log.open("w"), stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def worker(self, redis_url: str, prefix: str, *extra: str, worker_id: str | None = None) -> Proc:
        wid = worker_id or "w-" + uuid.uuid4().hex[:6]
        return self.start(wid, "worker", "--redis-url", redis_url, "--redis-prefix", prefix,
                          "--model", MODEL, "--engine", "fake", "--worker-id", wid,
                          "--health-listen", "127.0.0.1:0", "--heartbeat-ttl-s", "1",
                          *extra)

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


@dataclass
class RedisServer:
    port: int
    password: str | None
    tmp: Path
    tls: dict[str, str] | None = None     # cert, key, ca (PEM paths): TLS only, on `port`
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.tmp / f"redis-{self.port}.log"

    def _args(self) -> list[str]:
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.tmp)]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                     "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                     "--tls-ca-cert-file", self.tls["ca"]]
        else:
            args += ["--port", str(self.port)]
        return args + (["--requirepass", self.password] if self.password else [])

    def start(self) -> None:
        """Start and wait until the port accepts; RuntimeError (with the server's output) if
        it exits or does not listen within 10 s."""
        self.proc = subprocess.Popen(self._args(), stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("private redis-server did not start: " + self.log.read_text()[-500:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed")


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, on a free loopback port, no persistence, with AUTH."""
    need_redis_server()
    server = RedisServer(free_port(), "s3cret-" + uuid.uuid4().hex[:8], tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def prefix() -> str:
    return f"dynabatch-chaos-{uuid.uuid4().hex[:8]}:"


@dataclass
class Ledger:
    """Exact accounting: every submitted request ends completed or failed with a status."""
    submitted: int = 0
    completed: int = 0
    failed: Counter = field(default_factory=Counter)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    progress: dict[str, int] = field(default_factory=dict)     # tokens received so far

    def flowing(self, n: int, tokens: int = 3) -> bool:
        return sum(v >= tokens for v in self.progress.values()) >= n

    def check(self) -> None:
        assert self.submitted == self.completed + sum(self.failed.values()), self

    async def run(self, client: AsyncDynabatchClient, rid: str, prompt: list[int], n: int,
                  **fields) -> None:
        """One streamed request; asserts the stream is contiguous and, if it completes, exact."""
        self.submitted += 1
        got: list[int] = []
        try:
            async for msg in client.stream(prompt_token_ids=prompt, max_tokens=n, ignore_eos=True,
                                           request_id=rid, skip_text=True, **fields):
                assert msg.offset == len(got), f"{rid}: gap or duplicate at {msg.offset}"
                got.extend(msg.token_ids)
                self.progress[rid] = len(got)
        except DynabatchError as e:
            self.failed[e.code.name] += 1
            self.tokens[rid] = got
            return
        assert got == expected_tokens(len(prompt), n), f"{rid}: wrong tokens"
        self.completed += 1
        self.tokens[rid] = got


@pytest.fixture
async def redis_stack(redis_url, prefix):
    """An in-process scheduler on the shared Redis (own key prefix, purged after), no workers:
    the test starts worker processes itself."""
    from dynabatch.cli.stack import LocalStack, StackConfig
    from dynabatch.scheduler_svc.policy import PolicyConfig
    # A lenient TTFT target: these tests count losses, and admission control (tested on its
    # own) must not turn a request away because the measured service rate says it would wait.
    stack = LocalStack(StackConfig(model=MODEL, engine="fake", workers=0, redis_url=redis_url,
                                   redis_prefix=prefix,
                                   policy_config=PolicyConfig(ttft_target_s=600)))
    async with stack:
        yield stack
    await purge(redis_url, prefix)


async def purge(redis_url: str, prefix: str) -> None:
    from dynabatch.wire.redis_queue import RedisQueue
    queue = RedisQueue(redis_url, prefix)
    await queue.purge()
    await queue.close()


async def has_worker(client: AsyncDynabatchClient) -> bool:
    """The scheduler answers and sees at least one live worker."""
    try:
        return bool((await client.stats()).workers)
    except DynabatchError:
        return False


def live_workers(stack) -> set[str]:
    return {w.worker_id for w in stack.scheduler.batching.workers}


def running_on(stack) -> Counter:
    """Requests in flight per worker, as the scheduler sees them."""
    return Counter(t.worker_id for t in stack.scheduler.table.by_id.values() if t.worker_id)
