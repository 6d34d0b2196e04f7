"""Selection order (seed 000's policy_select, extended).

score = urgency + short-job bonus, with
  urgency = waited / max_wait + deadline pressure (1 − slack / max_wait, in [0, 1], for a request
            with a queue deadline or its own TTFT target: slack until the earlier of the two)
  bonus   = short_job_weight / (1 + predicted_output / short_job_tokens)
Requests are taken in the order (forced first, then class priority, then resumed, then score):
  * forced: waited >= max_wait — SLA protection, oldest first, ahead of every class;
  * class priority dominates the score (high before normal before low);
  * a request re-queued after a preemption or crash goes to the front of its class.
FIFO policies use (resumed first, arrival).
"""
from __future__ import annotations

from .config import PolicyConfig
from .types import Waiting

Key = tuple[int, int, int, float]


def deadline_of(req: Waiting) -> float | None:
    """The earlier of the queue deadline and the request's own TTFT target (absolute)."""
    ttft = req.arrival_s + req.ttft_target_s if req.ttft_target_s > 0 else None
    if req.queue_deadline_s is None:
        return ttft
    return req.queue_deadline_s if ttft is None else min(ttft, req.queue_deadline_s)


def short_bonus(predicted_output: int, cfg: PolicyConfig) -> float:
    return cfg.short_job_weight / (1.0 + predicted_output / cfg.short_job_tokens)


def score(req: Waiting, predicted_output: int, now: float, cfg: PolicyConfig) -> float:
    urgency = (now - req.arrival_s) / cfg.max_wait_s
    deadline = deadline_of(req)
    if deadline is not None:
        urgency += min(1.0, max(0.0, 1.0 - (deadline - now) / cfg.max_wait_s))
    return urgency + short_bonus(predicted_output, cfg)


def forced(req: Waiting, now: float, cfg: PolicyConfig) -> bool:
    return now - req.arrival_s >= cfg.max_wait_s


def priority_key(req: Waiting, predicted_output: int, now: float, cfg: PolicyConfig) -> Key:
    """Sort ascending: the first key is taken first."""
    if forced(req, now, cfg):
        return (0, 0, 0, req.arrival_s)
    cls = req.priority if req.priority > 0 else 2
    return (1, -cls, 0 if req.resumed else 1, -score(req, predicted_output, now, cfg))


def fifo_key(req: Waiting) -> Key:
    return (0 if req.resumed else 1, 0, 0, req.arrival_s)
