"""Assembles the scheduler: queue, policy, batching loop, relay and the gRPC server."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from dynabatch.scheduler_svc.batching import BatchingLoop
from dynabatch.scheduler_svc.handlers import add_scheduler_service
from dynabatch.scheduler_svc.metrics import SchedulerMetrics
from dynabatch.scheduler_svc.policy import PolicyConfig, make_policy
from dynabatch.scheduler_svc.recovery import Recovery
from dynabatch.scheduler_svc.relay import Relay
from dynabatch.scheduler_svc.requests import Failure, RequestTable
from dynabatch.scheduler_svc.security import BearerTokenAuth, TlsFiles, server_credentials
from dynabatch.scheduler_svc.service import SchedulerService
from dynabatch.scheduler_svc.telemetry import SchedulerTelemetry
from dynabatch.scheduler_svc.validation import Limits, ModelInfo
from dynabatch.v1 import scheduler_pb2
from dynabatch.wire import models as registry
from dynabatch.wire import telemetry
from dynabatch.wire.backoff import Backoff
from dynabatch.wire.heap import freeze_startup_heap
from dynabatch.wire.queue import Queue, QueueError
from dynabatch.wire.traced_queue import traced

log = logging.getLogger("dynabatch.scheduler")
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
MAX_MESSAGE_BYTES = 8 << 20


@dataclass
class SchedulerConfig:
    listen: str = "127.0.0.1:50051"
    models: list[str] = field(default_factory=lambda: [registry.DEFAULT_MODEL])
    policy: str = "fcfs"
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    limits: Limits = field(default_factory=Limits)
    scheduler_id: str = field(default_factory=lambda: "sched-" + uuid.uuid4().hex[:8])
    drain_grace_s: float = 30.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    tls: TlsFiles | None = None              # None: plaintext
    auth_token: str | None = None            # None: no authentication
    metrics_port: int | None = None          # Prometheus /metrics; None: not served (0: any)
    # Spans go to this provider; None: the global SDK provider if one is installed, else off.
    tracer_provider: TracerProvider | None = None


def model_info(name: str) -> ModelInfo:
    """What the scheduler needs of a model: tokenizer and limits (no weights)."""
    cfg = registry.load_config(name)
    return ModelInfo(name=name, max_model_len=registry.max_model_len(cfg),
                     vocab_size=int(cfg.vocab_size), tokenizer=registry.load_tokenizer(name))


class SchedulerServer:
    def __init__(self, queue: Queue, config: SchedulerConfig) -> None:
        tracer = telemetry.get_tracer("scheduler", config.tracer_provider)
        queue = traced(queue, tracer)      # Redis calls of traced requests get spans
        self.cfg, self.queue = config, queue
        self.policy = make_policy(config.policy, config.policy_config)
        self.metrics = SchedulerMetrics()
        self.telemetry = SchedulerTelemetry(
            self.policy, getattr(self.policy, "config", config.policy_config), tracer, self.metrics)
        self.metrics_server = (None if config.metrics_port is None else
                               telemetry.MetricsServer(self.metrics.registry, config.metrics_port))
        self.table = RequestTable(on_end=self.telemetry.ended)
        self.batching = BatchingLoop(queue, self.policy, self.table, config.scheduler_id,
                                     telemetry=self.telemetry)
        self.relay = Relay(queue, config.scheduler_id, self.table, self.policy, self.batching,
                           self.telemetry)
        self.recovery = Recovery(queue, self.table, config.scheduler_id)
        models = {m: model_info(m) for m in config.models}
        self.service = SchedulerService(
            queue=queue, policy=self.policy, table=self.table, batching=self.batching,
            models=models, default_model=config.models[0], limits=config.limits,
            scheduler_id=config.scheduler_id, telemetry=self.telemetry)
        self.health = health.aio.HealthServicer()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Restore this scheduler's requests, bind, start serving and the loops; returns the port."""
        await self._restore()
        interceptors = [BearerTokenAuth(self.cfg.auth_token)] if self.cfg.auth_token else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
            ("grpc.max_send_message_length", self.cfg.max_message_bytes)])
        add_scheduler_service(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = (self.server.add_secure_port(self.cfg.listen, server_credentials(self.cfg.tls))
                     if self.cfg.tls else self.server.add_insecure_port(self.cfg.listen))
        if self.port == 0:
            raise OSError(f"cannot listen on {self.cfg.listen}")
        await self.server.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
        self._tasks = [asyncio.create_task(self.batching.run(self._stop), name="batching"),
                       asyncio.create_task(self.relay.run(self._stop), name="relay"),
                       asyncio.create_task(self.recovery.run(self._stop), name="recovery")]
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        freeze_startup_heap()        # (once per process: wire/heap.py)
        log.info("scheduler %s listening on %s (%s%s; policy %s, models %s)", self.cfg.scheduler_id,
                 self.cfg.listen.rsplit(":", 1)[0] + f":{self.port}",
                 ("mTLS" if self.cfg.tls.client_ca else "TLS") if self.cfg.tls else "plaintext",
                 ", bearer token" if self.cfg.auth_token else "", self.cfg.policy, self.cfg.models)
        return self.port

    async def _restore(self) -> None:
        """Take back our requests from the queue, retrying while it is unreachable."""
        backoff = Backoff()
        while True:
            try:
                await self.recovery.restore()
                backoff.ok("restore")
                return
            except QueueError as e:
                await backoff.wait(e, "restore")

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, no new admissions; running streams may finish within the grace
        period; the rest are handed back (their clients Resume on the next instance)."""
        grace = self.cfg.drain_grace_s if grace_s is None else grace_s
        self.service.accepting = False
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = asyncio.get_running_loop().time() + grace
        while self.table.by_id and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self.table.by_id:
            log.info("handing back %d requests still in flight", len(self.table.by_id))
            self.table.detach_all(Failure(grpc.StatusCode.UNAVAILABLE,
                                          "scheduler restarting: resume by request id"))
        if self.server is not None:
            await self.server.stop(0.5)
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("scheduler %s stopped", self.cfg.scheduler_id)
