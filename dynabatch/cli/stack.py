"""A whole dynabatch stack in this process: one scheduler and N workers on one queue.

`dynabatch up`, the tests and `bench replay` use it. With a Redis URL the scheduler and workers
still meet only through Redis, exactly as separate processes would.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from opentelemetry.sdk.trace import TracerProvider

from dynabatch.scheduler_svc.policy import PolicyConfig
from dynabatch.scheduler_svc.server import SchedulerConfig, SchedulerServer
from dynabatch.wire.models import DEFAULT_MODEL
from dynabatch.wire.queue import connect
from dynabatch.worker_svc.app import new_worker_id
from dynabatch.worker_svc.engine_client import EngineProcess
from dynabatch.worker_svc.engine_proc import EngineSpec
from dynabatch.worker_svc.config import WorkerConfig
from dynabatch.worker_svc.loop import WorkerLoop


@dataclass
class StackConfig:
    model: str = DEFAULT_MODEL
    policy: str = "fcfs"
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    engine: str = "torch"                      # or "fake"
    engine_options: dict = field(default_factory=dict)
    workers: int = 1
    redis_url: str | None = None
    redis_prefix: str | None = None            # default: a fresh prefix per stack
    scheduler_options: dict = field(default_factory=dict)   # more SchedulerConfig fields (TLS...)
    # Scheduler /metrics on this port, worker i on port + 1 + i (0: free ports); None: off.
    metrics_port: int | None = None
    # Spans go to this provider; None: the global SDK provider if one is installed, else off.
    tracer_provider: TracerProvider | None = None


class LocalStack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.cfg = config or StackConfig()
        prefix = self.cfg.redis_prefix or f"dynabatch-test-{uuid.uuid4().hex[:8]}:"
        self.queue = connect(self.cfg.redis_url, prefix)
        self.scheduler = SchedulerServer(self.queue, SchedulerConfig(
            listen="127.0.0.1:0", models=[self.cfg.model], policy=self.cfg.policy,
            policy_config=self.cfg.policy_config, drain_grace_s=2.0,
            metrics_port=self.cfg.metrics_port, tracer_provider=self.cfg.tracer_provider,
            **self.cfg.scheduler_options))
        self.loops: list[WorkerLoop] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.scheduler.port}"

    async def __aenter__(self) -> LocalStack:
        await self.scheduler.start()
        for _ in range(self.cfg.workers):
            await self.add_worker()
        return self

    async def add_worker(self) -> WorkerLoop:
        # In a thread of this process: one torch import serves every worker of the stack (the
        # deployed `dynabatch worker` runs its engine in a process of its own).
        engine = EngineProcess(EngineSpec(self.cfg.engine, self.cfg.model,
                                          self.cfg.engine_options), in_thread=True)
        await engine.start()
        port = self.cfg.metrics_port
        if port:
            port += 1 + len(self.loops)
        loop = WorkerLoop(self.queue, engine, WorkerConfig(
            worker_id=new_worker_id(), model=self.cfg.model, metrics_port=port,
            tracer_provider=self.cfg.tracer_provider))
        self.loops.append(loop)
        self._tasks.append(asyncio.create_task(loop.run(self._stop), name=loop.cfg.worker_id))
        return loop

    async def __aexit__(self, *exc) -> None:
        await self.scheduler.stop(grace_s=1.0)
        for loop in self.loops:           # drop unfinished work so shutdown is prompt
            loop.drain = False
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if hasattr(self.queue, "purge") and not self.cfg.redis_prefix:
            await self.queue.purge()
        await self.queue.close()
