"""The batching loop: worker feedback and the waiting queue in, the policy's decision out.

All decisions are the policy's (scheduler_svc/policy, pure); this loop only gathers its inputs
and carries out what it decided.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import grpc

from dynabatch.scheduler_svc.policy import Assigned, Decision, Policy, Waiting, WorkerView
from dynabatch.scheduler_svc.requests import Failure, RequestTable, Tracked
from dynabatch.scheduler_svc.telemetry import SchedulerTelemetry
from dynabatch.v1.worker_pb2 import WorkerControl, WorkerFeedback, WorkItem
from dynabatch.wire.backoff import Backoff
from dynabatch.wire.queue import Queue, QueueError

log = logging.getLogger("dynabatch.scheduler")


def to_waiting(item: WorkItem) -> Waiting:
    deadline = item.queue_deadline_unix_ns / 1e9 if item.queue_deadline_unix_ns else None
    return Waiting(request_id=item.request_id, prompt_tokens=len(item.prompt_token_ids),
                   max_tokens=item.max_tokens, arrival_s=item.arrival_unix_ns / 1e9,
                   priority=item.priority or 2, expected_output_tokens=item.expected_output_tokens,
                   ttft_target_s=item.ttft_target_ms / 1000, tpot_target_s=item.tpot_target_ms / 1000,
                   queue_deadline_s=deadline, resumed=item.attempt > 0)


def _assigned(t: Tracked) -> Assigned:
    """A running request as the policy sees it, rebuilt only when it changed: every tick reads
    every running request, most of which have not moved since the last one."""
    key = (len(t.output), t.item.predicted_output_tokens, t.item.bin)
    if t.policy_view is None or t.policy_view[0] != key:
        item = t.item
        t.policy_view = (key, Assigned(
            request_id=item.request_id, prompt_tokens=len(item.prompt_token_ids),
            predicted_output_tokens=item.predicted_output_tokens or item.max_tokens,
            generated_tokens=key[0], bin=item.bin, first_token_s=_wall(t.first_token_at)))
    return t.policy_view[1]


def _wall(monotonic_s: float | None) -> float:
    """A time.monotonic() reading on the policy's clock (time.time()); 0.0 for None."""
    if monotonic_s is None:
        return 0.0
    return time.time() - (time.monotonic() - monotonic_s)


class BatchingLoop:
    # Workers write their feedback once per heartbeat (0.25 s by default), so a tick reuses a
    # read this recent instead of waiting a round trip for the same bytes before deciding.
    FEEDBACK_MAX_AGE_S = 0.02
    RESEND_S = 1.0

    def __init__(self, queue: Queue, policy: Policy, table: RequestTable, scheduler_id: str,
                 tick_s: float = 0.005, min_tick_s: float = 0.002,
                 telemetry: SchedulerTelemetry | None = None):
        self.queue, self.policy, self.table, self.tick_s = queue, policy, table, tick_s
        self.min_tick_s = min_tick_s
        self.telemetry = telemetry or SchedulerTelemetry.untraced(policy)
        self.scheduler_id = scheduler_id
        self.wake = asyncio.Event()
        self.workers: list[WorkerView] = []
        self.targets: dict[str, int] = {}
        self.waiting_count = 0
        self.last_waiting: list[Waiting] = []   # the latest snapshot (admission control reads it)
        self.models: dict[str, str] = {}         # worker id -> model it serves
        self.feedback: dict[str, WorkerFeedback] = {}   # worker id -> its last feedback
        self.backoff = Backoff()
        self._timed = False              # the tick about to run was the timer's, not a wake's
        self._feedback_read = -1.0       # time.monotonic() of the last workers() read
        self._caps_sent: dict[str, tuple[int, float]] = {}   # worker -> (cap, monotonic time)

    def slot_freed(self) -> None:
        """A request ended (or was cancelled): tick now only if one is waiting for the slot.
        Otherwise the wake is useless, and the next arrival finds the loop in its tick spacing
        instead of idle: up to `min_tick_s` of queue time for nothing."""
        if self.last_waiting:
            self.wake.set()

    def _on_timer(self) -> None:
        self._timed = True
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            timer = loop.call_later(self.tick_s, self._on_timer)   # (wait_for costs a task)
            try:
                await self.wake.wait()
            finally:
                timer.cancel()
            self.wake.clear()
            timed, self._timed = self._timed, False
            started = time.monotonic()
            try:
                await self.tick(time.time())
                self.backoff.ok("batching")
            except QueueError as e:
                await self.backoff.wait(e, "batching")
            except Exception:  # one bad tick must not stop scheduling
                log.exception("batching tick failed")
                await asyncio.sleep(0.1)
            # Under load wakes come faster than ticks: space them (bounded CPU, <= 2 ms delay).
            # A periodic tick needs no spacing: the next wake, an arrival, may tick at once.
            if not timed:
                await asyncio.sleep(max(0.0, self.min_tick_s - (time.monotonic() - started)))

    async def tick(self, now: float) -> None:
        if time.monotonic() - self._feedback_read < self.FEEDBACK_MAX_AGE_S:
            feedback, waiting = list(self.feedback.values()), await self.queue.waiting()
        else:   # the two reads are independent: one round trip of waiting, not two in a row
            feedback, waiting = await asyncio.gather(self.queue.workers(), self.queue.waiting())
            self._feedback_read = time.monotonic()
        self.models = {fb.worker_id: fb.model for fb in feedback}
        self.feedback = {fb.worker_id: fb for fb in feedback}
        self.workers = [self._view(fb, now) for fb in feedback]
        for view in self.workers:        # the policy ignores feedback whose steps did not advance
            self.policy.observe(view, now)
        items = {i.request_id: i for i in waiting}
        self.waiting_count = len(items)
        self.last_waiting = [to_waiting(i) for i in items.values()]
        by_model: dict[str, list[Waiting]] = defaultdict(list)
        for w in self.last_waiting:
            by_model[items[w.request_id].model].append(w)
        for model, waiting in by_model.items():
            workers = [v for v in self.workers if self.models[v.worker_id] == model]
            await self._carry_out(self.policy.decide(waiting, workers, now), items)
        self.telemetry.tick(now, self.last_waiting, self.workers, self.running_by_worker)

    async def _carry_out(self, decision: Decision, items: dict[str, WorkItem]) -> None:
        self.targets.update(decision.batch_targets)
        self.telemetry.decided(decision)
        for rid in decision.expired:
            if await self.queue.remove_waiting(rid):
                await self.queue.finish(rid)
                self.table.end(rid, "failed", Failure(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                      "waited in the queue past max_queue_ms"))
        for worker_id, ids in decision.assignments.items():
            await self._assign(worker_id, [items[i] for i in ids if i in items], decision)
        for worker_id, cap in decision.step_prefill_tokens.items():
            await self._send_cap(worker_id, cap)

    async def _send_cap(self, worker_id: str, cap: int) -> None:
        """Send a step prefill cap the worker does not have yet; again only after RESEND_S (its
        feedback, one heartbeat behind, still shows the old one meanwhile)."""
        fb = self.feedback.get(worker_id)
        if fb is None or fb.step_prefill_tokens == cap:
            return
        now = time.monotonic()
        last = self._caps_sent.get(worker_id)
        if last is not None and last[0] == cap and now - last[1] < self.RESEND_S:
            return
        self._caps_sent[worker_id] = (cap, now)
        await self.queue.send_control(worker_id, WorkerControl(step_prefill_tokens=cap))

    async def _assign(self, worker_id: str, items: list[WorkItem], decision: Decision) -> None:
        for item in items:
            item.predicted_output_tokens = decision.predicted_output_tokens.get(item.request_id, 0)
            item.bin = decision.bins.get(item.request_id, 0)
        now = time.monotonic()
        ours = {i.request_id for i in items if i.scheduler_id == self.scheduler_id}
        for rid in await self.queue.assign(worker_id, items):
            tracked = self.table.get(rid)
            if tracked is None and rid in ours:   # cancelled while being assigned: stop it
                await self.queue.send_control(worker_id, WorkerControl(cancel_request_ids=[rid]))
            elif tracked is not None:
                tracked.worker_id, tracked.assigned_at = worker_id, now
                tracked.item.predicted_output_tokens = decision.predicted_output_tokens.get(rid, 0)
                tracked.item.bin = decision.bins.get(rid, 0)
                self.telemetry.assigned(tracked, worker_id, decision)

    def _view(self, fb: WorkerFeedback, now: float) -> WorkerView:
        assigned = tuple(_assigned(t) for t in self.table.on_worker(fb.worker_id))
        return WorkerView(worker_id=fb.worker_id, kv_blocks_total=fb.kv_blocks_total,
                          kv_blocks_used=fb.kv_blocks_used, kv_block_size=fb.kv_block_size or 16,
                          max_running=fb.max_running, max_model_len=fb.max_model_len,
                          decode_step_ms=fb.decode_step_ms, decode_batch_size=fb.decode_batch_size,
                          steps=fb.steps, heartbeat_age_s=max(0.0, now - fb.unix_ns / 1e9),
                          accepting=fb.accepting, assigned=assigned,
                          prefill_tokens_per_s=fb.prefill_tokens_per_s,
                          step_prefill_tokens=fb.step_prefill_tokens)

    def running_by_worker(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for t in self.table.by_id.values():
            if t.worker_id and not t.finished:
                counts[t.worker_id] += 1
        return counts
