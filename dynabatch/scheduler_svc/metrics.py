"""The scheduler's Prometheus metrics, in a registry of its own (one per scheduler instance).

Latency histograms carry the names of the GenAI semantic-convention metrics in Prometheus form
(gen_ai.server.time_to_first_token -> gen_ai_server_time_to_first_token_seconds). Every value is
measured by the scheduler (arrival, first token relayed, last token relayed) or is the figure
the policy decided with; nothing is estimated for display.
"""
from __future__ import annotations

from collections import deque

from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_SERVER_REQUEST_DURATION, GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynabatch.scheduler_svc.policy import Decision, WorkerView
from dynabatch.v1.scheduler_pb2 import Timings
from dynabatch.wire.telemetry import MeasuredGauge

# Bucket boundaries advised by the GenAI semantic conventions, with finer low buckets for TPOT
# (a GPU decode step is a few ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
SLA_WINDOW = 1000   # the attainment gauge covers the last this many completed requests


def prom_name(semconv_metric: str) -> str:
    """gen_ai.server.time_to_first_token -> gen_ai_server_time_to_first_token (unit added later)."""
    return semconv_metric.replace(".", "_")


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.queue_depth = Gauge("dynabatch_queue_depth", "Requests waiting, by policy length bin",
                                 ["bin"], registry=r)
        self.admissions = Counter("dynabatch_admissions", "Requests admitted into the queue",
                                  registry=r)
        self.rejections = Counter("dynabatch_rejections", "Requests refused before queueing",
                                  ["reason"], registry=r)
        self.finished = Counter("dynabatch_requests_finished", "Admitted requests that ended",
                                ["outcome"], registry=r)
        self.running = Gauge("dynabatch_running", "Requests assigned to a worker, not finished",
                             ["worker"], registry=r)
        self.batch_size = Gauge("dynabatch_batch_size", "Mean decode batch size the worker "
                                "measured over its recent steps", ["worker"], registry=r)
        self.b_mem = Gauge("dynabatch_b_mem", "Memory bound on the batch (Alg. 1)", ["worker"],
                           registry=r)
        self.b_sla = Gauge("dynabatch_b_sla", "SLA bound on the batch (Alg. 2)", ["worker"],
                           registry=r)
        self.b_target = Gauge("dynabatch_b_target", "Batch target the policy assigns against",
                              ["worker"], registry=r)
        self.step_prefill_tokens = Gauge(
            "dynabatch_step_prefill_tokens", "Prompt tokens one engine step may prefill, as the "
            "policy capped it (policy/prefill_cap.py)", ["worker"], registry=r)
        self.ttft = Histogram(prom_name(GEN_AI_SERVER_TIME_TO_FIRST_TOKEN),
                              "Arrival to first token relayed", ["gen_ai_request_model"],
                              unit="seconds", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(prom_name(GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN),
                              "Mean time between output tokens after the first, per request",
                              ["gen_ai_request_model"], unit="seconds", buckets=TPOT_BUCKETS,
                              registry=r)
        self.duration = Histogram(prom_name(GEN_AI_SERVER_REQUEST_DURATION),
                                  "Arrival to the end of the request", ["gen_ai_request_model",
                                                                        "error_type"],
                                  unit="seconds", buckets=DURATION_BUCKETS, registry=r)
        self.sla_evaluated = Counter("dynabatch_sla_evaluated", "Completed requests checked "
                                     "against their TTFT and TPOT targets", registry=r)
        self.sla_met = Counter("dynabatch_sla_met", "Completed requests that met both targets",
                               registry=r)
        self.sla_attainment = MeasuredGauge("dynabatch_sla_attainment", "Fraction of the last "
                                            f"{SLA_WINDOW} completed requests that met both "
                                            "targets", r)
        self.input_tokens = Counter("dynabatch_input_tokens", "Prompt tokens of admitted requests",
                                    registry=r)
        self.output_tokens = Counter("dynabatch_output_tokens", "Output tokens relayed to clients",
                                     registry=r)
        self.tokens_per_s = MeasuredGauge("dynabatch_output_tokens_per_second", "Output tokens "
                                          "relayed per second between the last two refreshes", r)
        self._sla_window: deque[bool] = deque(maxlen=SLA_WINDOW)
        self._sla_window_met = 0     # True values in _sla_window (kept, not summed per request)
        # labelled children by label values: labels() takes a lock and validates on every call,
        # these are looked up once per request (series are never removed from these metrics)
        self._children: dict[tuple, object] = {}
        self._workers: set[str] = set()
        self._rate_mark: tuple[float, float] | None = None   # (time, output tokens then)
        self.output_total = 0        # output tokens relayed so far
        self._output_counted = 0     # of which in the output_tokens counter

    def tick(self) -> None:
        """The output token counter catches up with `output_total` (added to per delta)."""
        if self.output_total > self._output_counted:
            self.output_tokens.inc(self.output_total - self._output_counted)
            self._output_counted = self.output_total

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, cached (for the per-request metrics, whose series are never
        removed)."""
        key = (metric, *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def completed(self, model: str, timings: Timings, ttft_target_s: float,
                  tpot_target_s: float) -> None:
        """A request ended normally: latency histograms and SLA attainment."""
        n, ttft_s, tpot_s = timings.output_tokens, timings.ttft_ms / 1000, timings.tpot_ms / 1000
        if n:
            self.child(self.ttft, model).observe(ttft_s)
        if n > 1:
            self.child(self.tpot, model).observe(tpot_s)
        met = ttft_s <= ttft_target_s and (n < 2 or tpot_s <= tpot_target_s)
        self.sla_evaluated.inc()
        if met:
            self.sla_met.inc()
        window = self._sla_window
        if len(window) == window.maxlen:
            self._sla_window_met -= window[0]       # about to fall out
        window.append(met)
        self._sla_window_met += met
        self.sla_attainment.set(self._sla_window_met / len(window))

    def decided(self, d: Decision) -> None:
        for worker, v in d.b_mem.items():
            self.b_mem.labels(worker).set(v)
        for worker, v in d.b_sla.items():
            self.b_sla.labels(worker).set(v)
        for worker, v in d.batch_targets.items():
            self.b_target.labels(worker).set(v)
        for worker, v in d.step_prefill_tokens.items():
            self.step_prefill_tokens.labels(worker).set(v)

    def refresh(self, now: float, depth_by_bin: dict[int, int], workers: list[WorkerView],
                running: dict[str, int]) -> None:
        """Gauges sampled from the batching loop's latest view."""
        for b, n in depth_by_bin.items():
            self.queue_depth.labels(str(b)).set(n)
        live = {w.worker_id for w in workers}
        for gone in self._workers - live:       # a dead worker's gauges go with it
            for g in (self.running, self.batch_size, self.b_mem, self.b_sla, self.b_target,
                      self.step_prefill_tokens):
                try:
                    g.remove(gone)
                except KeyError:
                    pass
        self._workers = live
        for w in workers:
            self.batch_size.labels(w.worker_id).set(w.decode_batch_size)
            self.running.labels(w.worker_id).set(running.get(w.worker_id, 0))
        if self._rate_mark is not None and now > self._rate_mark[0]:
            t0, n0 = self._rate_mark
            self.tokens_per_s.set((self.output_total - n0) / (now - t0))
        self._rate_mark = (now, self.output_total)
