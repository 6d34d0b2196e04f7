"""The worker loop: pull assignments, hand them to the engine process, publish its tokens and
the worker's feedback. Thin by design: the engine decides how to batch, the scheduler decides
what to send.

The engine runs in a process of its own (engine_proc.py) and steps back to back; this process
only does queue I/O, so nothing here ever holds the GIL the engine's Python needs between GPU
launches. Per step the engine sends flat arrays of rows (engine_wire.py); this loop merges them
per request and publishes one write per scheduler, as often as steps come or every
publish_interval_s when they come faster.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict

from dynabatch.v1.scheduler_pb2 import FinishReason
from dynabatch.v1.worker_pb2 import TokenDelta, TokenDeltaBatch, WorkerFeedback, WorkItem
from dynabatch.wire.backoff import Backoff
from dynabatch.wire import telemetry
from dynabatch.wire.heap import freeze_startup_heap
from dynabatch.wire.queue import Queue, QueueError
from dynabatch.wire.traced_queue import traced
from dynabatch.worker_svc import engine_wire as wire
from dynabatch.worker_svc.config import WorkerConfig
from dynabatch.worker_svc.engine.api import TokenOutput
from dynabatch.worker_svc.engine_client import EngineDied, EngineProcess
from dynabatch.worker_svc.metrics import WorkerMetrics
from dynabatch.worker_svc.tracing import WorkerTracing

log = logging.getLogger("dynabatch.worker")

_FINISH = {"stop": FinishReason.FINISH_REASON_STOP, "length": FinishReason.FINISH_REASON_LENGTH,
           "abort": FinishReason.FINISH_REASON_CANCELLED}


class WorkerLoop:
    def __init__(self, queue: Queue, engine: EngineProcess, config: WorkerConfig) -> None:
        tracer = telemetry.get_tracer("worker", config.tracer_provider)
        self.queue, self.engine, self.cfg = traced(queue, tracer), engine, config
        self.tracing = WorkerTracing(tracer, config.worker_id, config.model) if tracer else None
        self.metrics = WorkerMetrics()
        self.metrics_server = (None if config.metrics_port is None else
                               telemetry.MetricsServer(self.metrics.registry, config.metrics_port))
        self.owner: dict[str, tuple[str, int]] = {}   # request id -> (relaying scheduler, attempt)
        self.accepting = True
        self.drain = True        # on stop: finish running requests (False: abort them)
        self._feedback: WorkerFeedback | None = None
        self._feedback_at = 0.0
        # Attempts handed to the engine and not ended there, by handle (engine_wire.py).
        self._live: dict[int, str] = {}
        self._handle: dict[str, int] = {}
        self._handles = itertools.count(1)
        # Outputs not yet published, merged per request: steps faster than publish_interval_s
        # share one write (and one delta per request); kept for a retry while the queue is down.
        self._pending: dict[str, TokenOutput] = {}
        self._errors: dict[str, str] = {}
        self._inbox: list[WorkItem] = []      # pulled, not yet handed to the engine
        self._cancels: list[str] = []         # read, not yet sent to the engine
        self._pull: asyncio.Task | None = None   # the pull in flight (see _take_pulled)
        self._urgent = False                  # pending holds a first token or a finish
        self._last_publish = 0.0
        self._last_control = 0.0
        self._epoch: str | None = None
        self._lost = False       # the queue lost its data (Redis restarted): drop all work
        self._backoff = Backoff(max_s=config.backoff_max_s)

    def has_work(self) -> bool:
        """Requests handed to the engine that have not ended there."""
        return bool(self._live)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then finish the running requests (drain). Raises
        EngineDied if the engine process exits on its own."""
        await self.engine.start()
        freeze_startup_heap()
        log.info("worker %s serving model %s", self.cfg.worker_id, self.cfg.model)
        if self.metrics_server is not None:
            self.metrics_server.start()
        self._refresh_feedback(force=True)
        beats_done = asyncio.Event()
        beats = asyncio.create_task(self._heartbeats(beats_done), name="heartbeats")
        died = False
        try:
            while (not stop.is_set() or self._live or self._pull or self._inbox or self._pending
                   or self._errors):
                self.accepting = not stop.is_set()
                if not self.accepting and not self.drain:
                    self._abort_all()
                try:
                    await self._iteration()
                    self._backoff.ok(self.cfg.worker_id)
                except QueueError as e:
                    await self._backoff.wait(e, self.cfg.worker_id)
        except EngineDied:
            died = True
            raise
        finally:
            self.accepting = False
            if self._pull is not None:   # only when the loop failed: what it took is reclaimed
                self._pull.cancel()
            if died:     # no last heartbeat: it would delay the reclaim of what this worker held
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)
            else:
                self._refresh_feedback(force=True)
                beats_done.set()
                await beats
            if self.tracing:
                self.tracing.close("worker stopped")
            if self.metrics_server is not None:
                self.metrics_server.stop()
            await self.engine.close()
        log.info("worker %s stopped", self.cfg.worker_id)

    def _abort_all(self) -> None:
        if self._pull is not None:      # what it took stays unacknowledged: reclaimed later
            self._pull.cancel()
            self._pull = None
        if self._live:
            self.engine.abort_all()
        self._live.clear()
        self._handle.clear()
        self.owner.clear()
        self._inbox.clear()
        self._cancels.clear()
        self._pending.clear()
        self._errors.clear()
        if self.tracing:
            self.tracing.close("dropped by the worker")

    async def _iteration(self) -> None:
        """Hand what was pulled to the engine, publish when due, keep a pull in flight, read
        cancels; then wait for the engine's next rows (or new work, or a publish falling due).
        The engine never waits for any of this: it steps on in its own process."""
        if self._lost:
            log.warning("worker %s: the queue lost its data; dropping %d requests",
                        self.cfg.worker_id, len(self.owner))
            self._abort_all()
            self._lost = False
        self._apply_inbox()
        await self._flush()
        if self.accepting and self._pull is None:
            self._pull = asyncio.create_task(self.queue.pull(
                self.cfg.worker_id, self.cfg.max_pull, self.cfg.idle_poll_s), name="pull")
        now = time.perf_counter()
        if not self._live or now - self._last_control >= self.cfg.publish_interval_s:
            self._last_control = now
            for control in await self.queue.read_control(self.cfg.worker_id):
                self._cancels.extend(control.cancel_request_ids)
                if control.step_prefill_tokens:
                    self.engine.set_step_prefill_tokens(control.step_prefill_tokens)
            if self._cancels:
                self._apply_inbox()
        await self.engine.wait(self._pull, self._wait_s())
        self._take_pulled()
        self._take_engine()
        self._refresh_feedback()

    def _wait_s(self) -> float:
        """How long to wait for the engine: until a publish falls due, the next cancel read
        while it runs, or an idle poll."""
        if not self._live and self._pull is None:
            return 0.0
        if self._pending or self._errors:
            if self._urgent or not self._live:
                return 0.0
            due = self._last_publish + self.cfg.publish_interval_s - time.perf_counter()
            return max(0.0, due)
        return self.cfg.publish_interval_s if self._live else self.cfg.idle_poll_s

    async def _flush(self) -> None:
        """Publish what is pending if it is due: a first token or a finish at once (TTFT and
        end-to-end latency never wait), the rest every publish_interval_s, all of it when the
        engine is idle."""
        if not (self._pending or self._errors):
            return
        due = time.perf_counter() - self._last_publish >= self.cfg.publish_interval_s
        if due or self._urgent or not self._live:
            await self._publish()

    def _take_pulled(self) -> None:
        """Collect a finished pull. The pull stays in flight while the engine steps, blocking
        in the queue until work arrives: work assigned mid-step is in hand at once. A failed
        pull raises here (QueueError: backoff)."""
        if self._pull is not None and self._pull.done():
            task, self._pull = self._pull, None
            self._inbox.extend(task.result())

    def _apply_inbox(self) -> None:
        """Hand pulled assignments and cancels to the engine (it applies them between steps)."""
        try:
            self._take_pulled()
        finally:
            items, self._inbox = self._inbox, []
            for item in items:
                self._admit(item)
            cancels, self._cancels = self._cancels, []
            for rid in cancels:
                handle = self._handle.get(rid)
                if handle is not None:
                    self.engine.abort(handle)   # its end comes back as an "abort" row

    def _admit(self, item: WorkItem) -> None:
        """Hand an assignment to the engine; one it cannot take fails alone (never the worker):
        its error goes out with the next publish."""
        rid = item.request_id
        self.owner[rid] = (item.scheduler_id, item.attempt)
        if self.tracing:
            self.tracing.pulled(item)
        if item.model != self.cfg.model:
            why = f"model {item.model!r} is not served here ({self.cfg.model!r})"
        elif rid in self._handle:
            why = f"{rid}: already queued"
        else:
            handle = next(self._handles)
            self._live[handle], self._handle[rid] = rid, handle
            self.engine.add(handle, item)
            return
        log.error("worker %s rejected %s: %s", self.cfg.worker_id, rid, why)
        self._errors[rid] = why

    def _take_engine(self) -> None:
        """Take in what the engine sent: its rows (merged into pending), refused requests."""
        for frame in self.engine.take():
            if frame[:1] == wire.OUTPUTS:
                self._take_rows(wire.rows(frame))
            elif frame[:1] == wire.ADD_ERROR:
                rid = self._live.pop(wire.handle_of(frame), None)
                if rid is not None:
                    del self._handle[rid]
                    log.error("worker %s: engine rejected %s", self.cfg.worker_id, rid)
                    self._errors[rid] = wire.add_error_message(frame)

    def _take_rows(self, rows: wire.Rows) -> None:
        """Merge one OUTPUTS frame into pending, row by row (one pass: this is the serving
        side's per-step cost)."""
        if rows.stats is not None:
            self.engine.stats = rows.stats
        self.metrics.frame(rows)
        if self.tracing is not None and rows.kind:
            outputs = [TokenOutput(rid, [], 0) for h in rows.handles
                       if (rid := self._live.get(h)) is not None]
            with self.tracing.step(outputs, rows.start_ns, rows.kind, rows.seconds):
                self._merge_rows(rows)
        else:
            self._merge_rows(rows)

    def _merge_rows(self, rows: wire.Rows) -> None:
        """As _merge, straight from the frame's arrays (no intermediate objects)."""
        live, pending, handle_of = self._live, self._pending, self._handle
        finish, tokens, counts, offsets = rows.finish, rows.tokens, rows.counts, rows.offsets
        pos = 0
        for i, handle in enumerate(rows.handles):
            n = counts[i]
            rid = live.get(handle)
            if rid is None:             # a stale row: an attempt already dropped here
                pos += n
                continue
            toks = tokens[pos:pos + n].tolist()
            pos += n
            reason = wire.FINISH_NAMES[finish[i]]
            if reason:
                del live[handle], handle_of[rid]
                self._urgent = True
            prev = pending.get(rid)
            if prev is None or prev.finish_reason:
                offset = offsets[i]
                if offset == 0 and toks:
                    self._urgent = True
                pending[rid] = TokenOutput(rid, toks, offset, reason)
            else:
                prev.token_ids += toks
                prev.finish_reason = reason

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
        s = self.engine.stats
        return WorkerFeedback(
            worker_id=self.cfg.worker_id, model=self.cfg.model, running=s.running,
            waiting=s.waiting, kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used,
            kv_block_size=s.kv_block_size,
            # The engine's step time, or its step period back to back when more than that
            # (engine_proc.EngineServer._stats): the admission and SLA estimates rest on it.
            decode_step_ms=s.decode_step_ms,
            decode_batch_size=s.decode_batch_size, prefill_tokens_per_s=s.prefill_tokens_per_s,
            max_model_len=s.max_model_len, steps=s.steps, preemptions=s.preemptions,
            unix_ns=time.time_ns(), accepting=self.accepting, max_running=s.max_running,
            step_prefill_tokens=s.step_prefill_tokens)
