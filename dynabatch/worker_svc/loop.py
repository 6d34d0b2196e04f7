"""The worker loop: pull assignments, step the engine off the event loop, publish deltas and
feedback. Thin by design: the engine decides how to batch, the scheduler decides what to send.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from dynabatch.v1.scheduler_pb2 import FinishReason
from dynabatch.v1.worker_pb2 import TokenDelta, TokenDeltaBatch, WorkerFeedback, WorkItem
from dynabatch.wire.backoff import Backoff
from dynabatch.wire import telemetry
from dynabatch.wire.queue import Queue, QueueError
from dynabatch.wire.traced_queue import traced
from dynabatch.worker_svc.engine.api import Engine, Sampling, SequenceRequest, TokenOutput
from dynabatch.worker_svc.metrics import WorkerMetrics
from dynabatch.worker_svc.tracing import WorkerTracing

log = logging.getLogger("dynabatch.worker")

_FINISH = {"stop": FinishReason.FINISH_REASON_STOP, "length": FinishReason.FINISH_REASON_LENGTH,
           "abort": FinishReason.FINISH_REASON_CANCELLED}


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


def to_sequence(item: WorkItem) -> SequenceRequest:
    s = item.sampling
    return SequenceRequest(
        request_id=item.request_id, prompt_token_ids=list(item.prompt_token_ids),
        max_tokens=item.max_tokens,
        sampling=Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
                          seed=s.seed if s.HasField("seed") else None),
        stop_token_ids=tuple(item.stop_token_ids), ignore_eos=item.ignore_eos,
        priority=item.priority or 2, resume_token_ids=list(item.resume_token_ids))


class WorkerLoop:
    def __init__(self, queue: Queue, engine: Engine, config: WorkerConfig) -> None:
        tracer = telemetry.get_tracer("worker", config.tracer_provider)
        self.queue, self.engine, self.cfg = traced(queue, tracer), engine, config
        self.tracing = WorkerTracing(tracer, config.worker_id, config.model) if tracer else None
        self.metrics = WorkerMetrics()
        self._step_start_ns = 0
        self.metrics_server = (None if config.metrics_port is None else
                               telemetry.MetricsServer(self.metrics.registry, config.metrics_port))
        self.owner: dict[str, tuple[str, int]] = {}   # request id -> (relaying scheduler, attempt)
        self.accepting = True
        self.drain = True        # on stop: finish running requests (False: abort them)
        self._feedback: WorkerFeedback | None = None  # refreshed between steps (engine thread-safety)
        self._feedback_at = 0.0
        # Outputs not yet published, merged per request: steps faster than publish_interval_s
        # share one write (and one delta per request); kept for a retry while the queue is down.
        self._pending: dict[str, TokenOutput] = {}
        self._errors: dict[str, str] = {}
        self._inbox: list[WorkItem] = []      # pulled during a step, admitted after it
        self._cancels: list[str] = []         # read during a step, applied after it
        self._pull: asyncio.Task | None = None   # the pull in flight (see _take_pulled)
        self._urgent = False                  # pending holds a first token or a finish
        self._last_publish = 0.0
        self._epoch: str | None = None
        self._lost = False       # the queue lost its data (Redis restarted): drop all work
        self._backoff = Backoff(max_s=config.backoff_max_s)
        self._last_step_end: float | None = None
        self._period_ms = 0.0    # EWMA of the time between consecutive steps (what clients see)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then finish the running requests (drain)."""
        log.info("worker %s serving model %s", self.cfg.worker_id, self.cfg.model)
        if self.metrics_server is not None:
            self.metrics_server.start()
        self._refresh_feedback(force=True)
        beats_done = asyncio.Event()
        beats = asyncio.create_task(self._heartbeats(beats_done), name="heartbeats")
        try:
            while not stop.is_set() or self.engine.has_work() or self._pull or self._inbox:
                self.accepting = not stop.is_set()
                if not self.accepting and not self.drain:
                    self._abort_all()
                try:
                    await self._iteration()
                    self._backoff.ok(self.cfg.worker_id)
                except QueueError as e:
                    await self._backoff.wait(e, self.cfg.worker_id)
        finally:
            self.accepting = False
            if self._pull is not None:   # only when the loop failed: what it took is reclaimed
                self._pull.cancel()
            self._refresh_feedback(force=True)
            beats_done.set()
            await beats
            if self.tracing:
                self.tracing.close("worker stopped")
            if self.metrics_server is not None:
                self.metrics_server.stop()
        log.info("worker %s stopped", self.cfg.worker_id)

    def _abort_all(self) -> None:
        if self._pull is not None:      # what it took stays unacknowledged: reclaimed later
            self._pull.cancel()
            self._pull = None
        for rid in list(self.owner):
            self.engine.abort(rid)
        self.owner.clear()
        self._inbox.clear()
        self._cancels.clear()
        self._pending.clear()
        self._errors.clear()
        if self.tracing:
            self.tracing.close("dropped by the worker")

    async def _iteration(self) -> None:
        """One engine step, with the queue I/O (publish the previous step's deltas, pull new
        assignments, read cancels) done while the step runs in its thread: the GPU never waits
        for Redis. What the I/O brings is applied between steps (the engine is not
        thread-safe); a failed I/O keeps the step's outputs pending for the next write."""
        if self._lost:
            log.warning("worker %s: the queue lost its data; dropping %d requests",
                        self.cfg.worker_id, len(self.owner))
            self._abort_all()
            self._lost = False
        if not self.engine.has_work():
            self._last_step_end = None
            try:
                await self._io(idle=True)
            finally:
                self._apply_inbox()
            if self._pending or self._errors:     # e.g. an assignment the engine refused
                await self._publish()
            self._refresh_feedback()
            return
        step = asyncio.create_task(self._step())
        try:
            await asyncio.sleep(0)          # let the step reach its thread before the I/O starts
            await self._io(idle=False)
        finally:
            outputs = await step
            with self._step_span(outputs):
                self._merge(outputs)
            self._apply_inbox()
            self._step_done()
        if not self.engine.has_work():      # nothing will step next: send what is left now
            await self._publish()
        self._refresh_feedback()

    async def _io(self, idle: bool) -> None:
        due = time.perf_counter() - self._last_publish >= self.cfg.publish_interval_s
        if (self._pending or self._errors) and (idle or due or self._urgent):
            await self._publish()
        if self.accepting and self._pull is None:
            self._pull = asyncio.create_task(self.queue.pull(
                self.cfg.worker_id, self.cfg.max_pull, self.cfg.idle_poll_s), name="pull")
        if idle and self._pull is not None:
            await asyncio.wait({self._pull})        # at most idle_poll_s
        self._take_pulled()
        for control in await self.queue.read_control(self.cfg.worker_id):
            self._cancels.extend(control.cancel_request_ids)

    def _take_pulled(self) -> None:
        """Collect a finished pull. The pull stays in flight across steps, blocking in the queue
        until work arrives: work assigned mid-step is in hand at the next step boundary, and
        no step waits for the queue. A failed pull raises here (QueueError: backoff)."""
        if self._pull is not None and self._pull.done():
            task, self._pull = self._pull, None
            self._inbox.extend(task.result())

    def _apply_inbox(self) -> None:
        """Between steps: admit pulled assignments, apply cancels read meanwhile."""
        try:
            self._take_pulled()
        finally:
            items, self._inbox = self._inbox, []
            for item in items:
                self._admit(item)
            cancels, self._cancels = self._cancels, []
            for rid in cancels:
                if self.engine.abort(rid):
                    self._merge([TokenOutput(rid, [], 0, "abort")])

    async def _step(self) -> list[TokenOutput]:
        """One engine step: in a thread (the event loop stays responsive), or inline for an
        engine whose steps are trivial (then yielding to the loop once per step)."""
        if getattr(self.engine, "inline_step", False):
            await asyncio.sleep(0)
            return self._timed_step()
        return await asyncio.to_thread(self._timed_step)

    def _timed_step(self) -> list[TokenOutput]:
        self._step_start_ns = time.time_ns()
        outputs = self.engine.step()
        self.metrics.step(outputs, (time.time_ns() - self._step_start_ns) / 1e9)
        return outputs

    def _step_done(self) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            ms = (now - self._last_step_end) * 1000
            self._period_ms = ms if not self._period_ms else 0.9 * self._period_ms + 0.1 * ms
        self._last_step_end = now

    def _admit(self, item: WorkItem) -> None:
        """Hand an assignment to the engine; one it cannot take fails alone (never the worker):
        its error goes out with the next publish."""
        self.owner[item.request_id] = (item.scheduler_id, item.attempt)
        if self.tracing:
            self.tracing.pulled(item)
        try:
            if item.model != self.cfg.model:
                raise ValueError(f"model {item.model!r} is not served here ({self.cfg.model!r})")
            self.engine.add(to_sequence(item))
        except Exception as e:   # a bad item must not take the worker down
            log.error("worker %s rejected %s: %s", self.cfg.worker_id, item.request_id, e)
            self._errors[item.request_id] = str(e)

    def _step_span(self, outputs: list[TokenOutput]):
        if self.tracing is None:
            return contextlib.nullcontext()
        record = getattr(self.engine, "last_step", None)
        return self.tracing.step(outputs, self._step_start_ns, record.kind if record else "step")

    async def _publish(self) -> None:
        """Send the pending deltas and errors (one write per scheduler). They survive a failed
        write and go with the next one."""
        if not (self._pending or self._errors):
            return
        batches: dict[str, TokenDeltaBatch] = defaultdict(TokenDeltaBatch)
        done = []
        for out in self._pending.values():
            delta = self._delta(out.request_id, out.token_ids, out.offset, out.finish_reason, batches)
            if delta is not None and out.finish_reason:
                done.append(out.request_id)
            if delta is not None and self.tracing and out.request_id in self.tracing.fresh:
                self.tracing.announce(delta)
        for rid, why in self._errors.items():
            delta = self._delta(rid, [], 0, None, batches)
            if delta is not None:
                delta.finish_reason, delta.error = FinishReason.FINISH_REASON_ERROR, why
                done.append(rid)
        now = time.time_ns()
        for batch in batches.values():
            batch.step_end_unix_ns = now
        if batches:
            await self.queue.publish(dict(batches))
        if self.tracing:
            self.tracing.published(self._pending, done, self._errors)
        self._pending, self._errors, self._urgent = {}, {}, False
        self._last_publish = time.perf_counter()
        for rid in done:
            self.owner.pop(rid, None)
        if done:
            await self.queue.ack(self.cfg.worker_id, done)

    def _merge(self, outputs: list[TokenOutput]) -> None:
        """Consecutive outputs of one request become one (contiguous tokens, last finish).
        A first token or a finish makes the next publish urgent (TTFT and end-to-end latency
        do not wait for publish_interval_s)."""
        for out in outputs:
            if out.finish_reason or (out.offset == 0 and out.token_ids):
                self._urgent = True
            prev = self._pending.get(out.request_id)
            if prev is None or prev.finish_reason:
                self._pending[out.request_id] = TokenOutput(out.request_id, list(out.token_ids),
                                                            out.offset, out.finish_reason)
            else:
                prev.token_ids.extend(out.token_ids)
                prev.finish_reason = out.finish_reason

    def _delta(self, rid: str, token_ids: list[int], offset: int, finish: str | None,
               batches: dict[str, TokenDeltaBatch]) -> TokenDelta | None:
        owner = self.owner.get(rid)
        if owner is None:
            return None
        # Field by field: protobuf's keyword constructor costs 2.5x more (~1 µs a delta, which
        # at batch 256 is a tenth of a small model's decode step).
        delta = batches[owner[0]].deltas.add()
        delta.request_id = rid
        delta.token_ids.extend(token_ids)
        delta.offset = offset
        delta.worker_id = self.cfg.worker_id
        if owner[1]:
            delta.attempt = owner[1]
        if finish:
            delta.finish_reason = _FINISH[finish]
        return delta

    def _refresh_feedback(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._feedback_at >= self.cfg.heartbeat_s / 2:
            self._feedback, self._feedback_at = self.feedback(), now
            self.metrics.feedback(self._feedback, now)

    async def _heartbeats(self, done: asyncio.Event) -> None:
        """Publish the latest feedback every heartbeat_s (also while a step runs), watch the epoch."""
        backoff = Backoff(max_s=self.cfg.backoff_max_s)
        while True:
            try:
                await self._beat()
                backoff.ok(self.cfg.worker_id + " heartbeat")
            except QueueError as e:
                await backoff.wait(e, self.cfg.worker_id + " heartbeat")
            if done.is_set():
                return
            try:
                await asyncio.wait_for(done.wait(), self.cfg.heartbeat_s)
            except TimeoutError:
                pass

    async def _beat(self) -> None:
        fb = WorkerFeedback()
        fb.CopyFrom(self._feedback)
        fb.unix_ns, fb.accepting = time.time_ns(), self.accepting
        await self.queue.heartbeat(fb, self.cfg.heartbeat_ttl_s)
        epoch = await self.queue.epoch()
        if self._epoch is not None and epoch != self._epoch:
            self._lost = True
        self._epoch = epoch

    def feedback(self) -> WorkerFeedback:
        s = self.engine.stats()
        return WorkerFeedback(
            worker_id=self.cfg.worker_id, model=self.cfg.model, running=s.running,
            waiting=s.waiting, kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used,
            kv_block_size=s.kv_block_size,
            # The engine's step time, or the step period clients see when the loop around it
            # (pull, publish) adds more: the admission and SLA estimates rest on it.
            decode_step_ms=max(s.decode_step_ms, self._period_ms),
            decode_batch_size=s.decode_batch_size, prefill_tokens_per_s=s.prefill_tokens_per_s,
            max_model_len=s.max_model_len, steps=s.steps, preemptions=s.preemptions,
            unix_ns=time.time_ns(), accepting=self.accepting, max_running=s.max_running)
