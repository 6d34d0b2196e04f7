"""Assembles a worker: engine process, worker loop, and a gRPC health endpoint for probes.

Health is NOT_SERVING until the model is loaded and again while draining, so a readiness probe
only routes... nothing: workers pull, they are never called; the probe tells Kubernetes when the
pod is ready and alive.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dynabatch.wire.queue import Queue
from dynabatch.worker_svc.engine_client import EngineDied, EngineProcess
from dynabatch.worker_svc.engine_proc import EngineSpec
from dynabatch.worker_svc.config import WorkerConfig
from dynabatch.worker_svc.loop import WorkerLoop

log = logging.getLogger("dynabatch.worker")


def new_worker_id() -> str:
    return "worker-" + uuid.uuid4().hex[:8]


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

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.server.stop(grace_s)


async def run_worker(queue: Queue, config: WorkerConfig, spec: EngineSpec, stop: asyncio.Event,
                     health_listen: str | None = None) -> None:
    """Start the engine process (model load), serve until `stop`, then drain. Raises
    EngineDied when the engine process exits on its own."""
    endpoint = HealthEndpoint(health_listen) if health_listen else None
    if endpoint:
        port = await endpoint.start()
        log.info("worker health on port %d", port)
    engine = EngineProcess(spec)
    loop = WorkerLoop(queue, engine, config)
    grace_s = 1.0
    try:
        await engine.start()
        if endpoint:
            await endpoint.set(True)
        await loop.run(stop)
    except EngineDied:
        grace_s = 0.0            # a crash: go now, the scheduler reclaims what was held
        raise
    finally:
        await engine.close()
        if endpoint:
            await endpoint.stop(grace_s)
