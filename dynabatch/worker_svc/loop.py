"""The worker loop: pull assignments, step the engine off the event loop, publish deltas and
feedback. Thin by design: the engine decides how to batch, the scheduler decides what to send.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from dynabatch.v1.scheduler_pb2 import FinishReason
from dynabatch.v1.worker_pb2 import TokenDelta, TokenDeltaBatch, WorkerFeedback, WorkItem
from dynabatch.wire.queue import Queue
from dynabatch.worker_svc.engine.api import Engine, Sampling, SequenceRequest, TokenOutput

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
        self.queue, self.engine, self.cfg = queue, engine, config
        self.owner: dict[str, str] = {}        # request id -> scheduler id that relays it
        self.accepting = True
        self.drain = True        # on stop: finish running requests (False: abort them)
        self._last_beat = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then finish the running requests (drain)."""
        log.info("worker %s serving model %s", self.cfg.worker_id, self.cfg.model)
        await self._heartbeat(force=True)
        while not stop.is_set() or self.engine.has_work():
            self.accepting = not stop.is_set()
            if not self.accepting and not self.drain:
                for rid in list(self.owner):
                    self.engine.abort(rid)
                self.owner.clear()
            await self._iteration()
        self.accepting = False
        await self._heartbeat(force=True)
        log.info("worker %s stopped", self.cfg.worker_id)

    async def _iteration(self) -> None:
        busy = self.engine.has_work()
        if self.accepting:
            items = await self.queue.pull(self.cfg.worker_id, self.cfg.max_pull,
                                          0 if busy else self.cfg.idle_poll_s)
            for item in items:
                self.owner[item.request_id] = item.scheduler_id
                self.engine.add(to_sequence(item))
        for control in await self.queue.read_control(self.cfg.worker_id):
            for rid in control.cancel_request_ids:
                if self.engine.abort(rid):
                    await self._publish([TokenOutput(rid, [], 0, "abort")])
        if self.engine.has_work():
            outputs = await asyncio.to_thread(self.engine.step)
            await self._publish(outputs)
        await self._heartbeat()

    async def _publish(self, outputs: list[TokenOutput]) -> None:
        batches: dict[str, TokenDeltaBatch] = defaultdict(TokenDeltaBatch)
        done = []
        for out in outputs:
            sched = self.owner.get(out.request_id)
            if sched is None:
                continue
            delta = TokenDelta(request_id=out.request_id, token_ids=out.token_ids, offset=out.offset,
                               worker_id=self.cfg.worker_id)
            if out.finish_reason:
                delta.finish_reason = _FINISH[out.finish_reason]
                done.append(out.request_id)
                del self.owner[out.request_id]
            batches[sched].deltas.append(delta)
        now = time.time_ns()
        for batch in batches.values():
            batch.step_end_unix_ns = now
        if batches:
            await self.queue.publish(dict(batches))
        if done:
            await self.queue.ack(self.cfg.worker_id, done)

    async def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.cfg.heartbeat_s:
            return
        self._last_beat = now
        await self.queue.heartbeat(self.feedback(), self.cfg.heartbeat_ttl_s)

    def feedback(self) -> WorkerFeedback:
        s = self.engine.stats()
        return WorkerFeedback(
            worker_id=self.cfg.worker_id, model=self.cfg.model, running=s.running,
            waiting=s.waiting, kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used,
            kv_block_size=s.kv_block_size, decode_step_ms=s.decode_step_ms,
            decode_batch_size=s.decode_batch_size, prefill_tokens_per_s=s.prefill_tokens_per_s,
            max_model_len=s.max_model_len, steps=s.steps, preemptions=s.preemptions,
            unix_ns=time.time_ns(), accepting=self.accepting, max_running=s.max_running)
