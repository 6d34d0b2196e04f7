"""A worker's Prometheus metrics, in a registry of its own (one per worker instance).

Step times are wall-clock times of `engine.step`, measured in the engine process; KV usage and
queue lengths are the engine's own counts, sampled with every heartbeat's feedback.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynabatch.v1.worker_pb2 import WorkerFeedback
from dynabatch.wire.telemetry import MeasuredGauge
from dynabatch.worker_svc.engine_wire import Rows

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.step_seconds = Histogram("dynabatch_worker_step_duration", "Wall time of one engine "
                                      "step by kind: prefill, decode, or step where the engine "
                                      "does not say (its _count: steps run)", ["kind"],
                                      unit="seconds", buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("dynabatch_worker_batch_size", "Requests with an output (tokens "
                                    "or their end) in a step", buckets=BATCH_BUCKETS, registry=r)
        self.engine_stalled = Counter("dynabatch_worker_engine_stalled", "Time the engine "
                                      "process, with work to do, waited for this process to take "
                                      "its outputs in (MAX_AHEAD steps ahead): the serving side "
                                      "set the pace", unit="seconds", registry=r)
        self.engine_gaps = Counter("dynabatch_worker_engine_gap", "Time between back-to-back "
                                   "engine steps (the engine process's loop, plus any stall)",
                                   unit="seconds", registry=r)
        self.output_tokens = Counter("dynabatch_worker_output_tokens", "Tokens generated",
                                     registry=r)
        self.tokens_per_s = MeasuredGauge("dynabatch_worker_output_tokens_per_second", "Tokens "
                                          "generated per second between the last two feedback "
                                          "refreshes", r)
        self.kv_used = Gauge("dynabatch_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("dynabatch_kv_blocks_total", "KV cache blocks in the pool",
                              registry=r)
        self.running = Gauge("dynabatch_worker_running", "Sequences in the running batch",
                             registry=r)
        self.waiting = Gauge("dynabatch_worker_waiting", "Sequences queued in the engine",
                             registry=r)
        self.preemptions = Counter("dynabatch_worker_preemptions", "Sequences preempted by the "
                                   "engine (KV cache full)", registry=r)
        self._tokens = 0
        self._mark: tuple[float, int] | None = None     # (time, tokens) at the last heartbeat
        self._preempted = 0

    def frame(self, rows: Rows) -> None:
        """One OUTPUTS frame of the engine process: its step (when one ran; len(rows) requests
        got an output, tokens or their end) and the engine's waits before it."""
        if rows.stalled_s:
            self.engine_stalled.inc(rows.stalled_s)
        if rows.gap_s:
            self.engine_gaps.inc(rows.gap_s)
        if not rows.kind:
            return
        self.step_seconds.labels(rows.kind).observe(rows.seconds)
        if len(rows):
            self.batch_size.observe(len(rows))
            self.output_tokens.inc(len(rows.tokens))
            self._tokens += len(rows.tokens)

    def feedback(self, s: WorkerFeedback, now: float) -> None:
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        if s.preemptions > self._preempted:
            self.preemptions.inc(s.preemptions - self._preempted)
            self._preempted = s.preemptions
        if self._mark is not None and now > self._mark[0]:
            t0, n0 = self._mark
            self.tokens_per_s.set((self._tokens - n0) / (now - t0))
        self._mark = (now, self._tokens)
