"""Admission control (issue 3, rule 6): a bounded queue, and early rejection when the predicted
queue wait already exceeds the request's deadline (queue deadline, or TTFT target: its own or
the configured default).

The wait estimate is Little's law on the workers' measured service rate: every worker turns its
b_target slots over once per (mean output length × decode step time), so requests leave the
queue at sum_w b_target_w / (mean_out × step_w) per second. A request waits for the requests of
its class or higher ahead of it, less the slots free right now. Without a measurement (no worker
has stepped yet) the wait is unknown and only the queue bounds apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .config import PolicyConfig
from .priority import deadline_of
from .slots import eligible
from .types import Admission, Waiting, WorkerView


def service_rate(workers: Sequence[WorkerView], targets: Mapping[str, int], mean_output: float,
                 cfg: PolicyConfig) -> float:
    """Requests per second the eligible, measured workers complete (0 if unknown)."""
    rate = 0.0
    for w in workers:
        if eligible(w, cfg) and w.decode_step_ms > 0:
            b = targets.get(w.worker_id, max(1, round(w.decode_batch_size)))
            rate += b / (max(mean_output, 1.0) * w.decode_step_ms / 1000.0)
    return rate


def free_slots(workers: Sequence[WorkerView], targets: Mapping[str, int],
               cfg: PolicyConfig) -> int:
    return sum(max(0, targets.get(w.worker_id, 0) - len(w.assigned))
               for w in workers if eligible(w, cfg))


@dataclass(frozen=True)
class QueueStats:
    """What admission needs from the queue: its length, its tokens (prompt + max_tokens) and
    how many requests each class (1..3) has. One O(n) pass, reused while the queue is the same."""
    length: int
    tokens: int
    by_class: tuple[int, int, int, int]

    @staticmethod
    def of(waiting: Sequence[Waiting]) -> QueueStats:
        by_class = [0, 0, 0, 0]
        tokens = 0
        for r in waiting:
            tokens += r.prompt_tokens + r.max_tokens
            by_class[min(max(r.priority or 2, 1), 3)] += 1
        return QueueStats(len(waiting), tokens, tuple(by_class))  # type: ignore[arg-type]

    def at_or_above(self, cls: int) -> int:
        return sum(self.by_class[min(max(cls or 2, 1), 3):])


def admit(req: Waiting, predicted_output: int, queue: QueueStats,
          workers: Sequence[WorkerView], targets: Mapping[str, int], mean_output: float,
          now: float, cfg: PolicyConfig) -> Admission:
    rate = service_rate(workers, targets, mean_output, cfg)

    def drain_time(n: int) -> float:
        """Seconds until n more requests have left the queue (fallback: a tenth of max_wait)."""
        return n / rate if rate > 0 else cfg.max_wait_s / 10

    if (queue.length >= cfg.max_queue_requests
            or queue.tokens + req.prompt_tokens + req.max_tokens > cfg.max_queue_tokens):
        excess = max(1, queue.length + 1 - cfg.max_queue_requests)
        return Admission(False, "queue_full", drain_time(excess))
    deadline = deadline_of(req, cfg.ttft_target_s)
    if deadline is None or rate <= 0:
        return Admission(True)
    ahead = queue.at_or_above(req.priority)
    wait = drain_time(max(0, ahead + 1 - free_slots(workers, targets, cfg)))
    if now + wait > deadline:
        return Admission(False, "deadline_unmeetable", now + wait - deadline)
    return Admission(True)
