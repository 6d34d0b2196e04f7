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


def deadline_of(req: Waiting, default_ttft_s: float = 0.0) -> float | None:
    """The earlier of the queue deadline and the request's TTFT target (its own, else
    `default_ttft_s` if > 0), absolute. Ordering passes no default: requests without their own
    target would all get the same pressure curve, which mostly restates their waiting time."""
    ttft_s = req.ttft_target_s if req.ttft_target_s > 0 else default_ttft_s
    ttft = req.arrival_s + ttft_s if ttft_s > 0 else None
    if req.queue_deadline_s is None:
        return ttft
    return req.queue_deadline_s if ttft is None else min(ttft, req.queue_deadline_s)


def short_bonus(predicted_output: int, cfg: PolicyConfig) -> float:
    return cfg.short_job_weight / (1.0 + predicted_output / cfg.short_job_tokens)


def score(req: Waiting, predicted_output: int, now: float, cfg: PolicyConfig) -> float:
    urgency = (now - req.arrival_s) / cfg.max_wait_s
    pressure = deadline_pressure(deadline_of(req), now, cfg)
    return urgency + pressure + short_bonus(predicted_output, cfg)


def deadline_pressure(deadline: float | None, now: float, cfg: PolicyConfig) -> float:
    if deadline is None:
        return 0.0
    return min(1.0, max(0.0, 1.0 - (deadline - now) / cfg.max_wait_s))


def forced(req: Waiting, now: float, cfg: PolicyConfig) -> bool:
    return now - req.arrival_s >= cfg.max_wait_s


def first(req: Waiting, now: float, cfg: PolicyConfig) -> bool:
    """Taken before every keyed request, oldest first: forced ones (priority ordering) or
    re-queued ones (FIFO ordering)."""
    if cfg.ordering == "fifo":
        return req.resumed
    return now - req.arrival_s >= cfg.max_wait_s


def base_key(req: Waiting, predicted_output: int, cfg: PolicyConfig) -> float:
    """Sort key (ascending) of a request that is not `first`, less its deadline pressure:
    computed once per request. FIFO: arrival. Priority: one float ordering like the tuple
    (−class, not resumed, −score) — the score term (arrival / max_wait − bonus − pressure;
    the common now / max_wait dropped) spreads less than `step` across requests that are not
    forced, so the class and resumed offsets dominate it."""
    if cfg.ordering == "fifo":
        return req.arrival_s
    step = cfg.short_job_weight + 3.0
    cls = req.priority if req.priority > 0 else 2
    return ((3 - cls) * 2 * step + (0.0 if req.resumed else step)
            + req.arrival_s / cfg.max_wait_s - short_bonus(predicted_output, cfg))


def key_at(base: float, deadline: float | None, now: float, cfg: PolicyConfig) -> float:
    """base_key with the deadline pressure at `now` (priority ordering only)."""
    if deadline is None or cfg.ordering == "fifo":
        return base
    return base - deadline_pressure(deadline, now, cfg)


def fifo_key(req: Waiting) -> tuple[bool, float]:
    """Arrival order, re-queued (resumed) requests first."""
    return (not req.resumed, req.arrival_s)
