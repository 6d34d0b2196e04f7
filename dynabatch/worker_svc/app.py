"""Assembles a worker: engine, worker loop, and a gRPC health endpoint for probes.

Health is NOT_SERVING until the model is loaded and again while draining, so a readiness probe
only routes... nothing: workers pull, they are never called; the probe tells Kubernetes when the
pod is ready and alive.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dynabatch.wire.queue import Queue
from dynabatch.worker_svc.engine.api import Engine
from dynabatch.worker_svc.loop import WorkerConfig, WorkerLoop

log = logging.getLogger("dynabatch.worker")


def new_worker_id() -> str:
    return "worker-" + uuid.uuid4().hex[:8]


def build(engine_kind: str, model: str, **engine_options) -> Engine:
    """`fake`: the model-free engine (tests, load benchmarks); otherwise the real engine."""
    if engine_kind == "fake":
        from dynabatch.worker_svc.fake_engine import FakeEngine
        return FakeEngine(**engine_options)
    from dynabatch.worker_svc.engine import build_engine
    return build_engine(model, **engine_options)


class HealthEndpoint:
    """grpc.health.v1 on its own small server (the worker serves no other RPC)."""

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.servicer = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = 0

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(self.listen)
        await self.server.start()
        await self.set(False)
        return self.port

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.servicer.set("", status)

    async def stop(self) -> None:
        await self.server.stop(1)


async def run_worker(queue: Queue, config: WorkerConfig, engine_factory, stop: asyncio.Event,
                     health_listen: str | None = None) -> None:
    """Load the engine (off the event loop), serve until `stop`, then drain."""
    endpoint = HealthEndpoint(health_listen) if health_listen else None
    if endpoint:
        port = await endpoint.start()
        log.info("worker health on port %d", port)
    engine = await asyncio.to_thread(engine_factory)
    # The engine steps in a thread while the event loop does the queue I/O; when the GPU
    # result arrives the step thread must get the GIL back promptly, not after CPython's
    # default 5 ms switch interval (longer than a whole decode step of a small model).
    sys.setswitchinterval(0.0002)
    if endpoint:
        await endpoint.set(True)
    loop = WorkerLoop(queue, engine, config)
    try:
        await loop.run(stop)
    finally:
        if endpoint:
            await endpoint.stop()
