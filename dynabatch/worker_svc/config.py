"""The worker's settings (the CLI fills them; the loop reads them)."""
from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider


@dataclass
class WorkerConfig:
    worker_id: str
    model: str
    heartbeat_s: float = 0.25       # feedback period
    heartbeat_ttl_s: float = 3.0    # a worker silent this long counts as dead
    idle_poll_s: float = 0.05       # how long an idle worker blocks waiting for work
    max_pull: int = 64              # assignments taken per iteration
    publish_interval_s: float = 0.005   # steps faster than this are published together
    backoff_max_s: float = 1.0      # longest wait between retries while the queue is down
    metrics_port: int | None = None   # Prometheus /metrics; None: not served (0: any port)
    # Spans go to this provider; None: the global SDK provider if one is installed, else off.
    tracer_provider: TracerProvider | None = None
