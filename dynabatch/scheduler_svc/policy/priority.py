"""Selection order (seed 000's policy_select, extended).

score = urgency + short-job bonus, with
  urgency = waited / max_wait + deadline pressure
  bonus   = short_job_weight / (1 + predicted_output / short_job_tokens)
Deadline pressure (requests with their own TTFT target or a queue deadline) is relative to the
request's TTFT budget T (its target, else the config's): with slack until the earlier of its
TTFT deadline and queue deadline,
  pressure = u · (T / slack − 1), clamped to [0, PRESSURE_CAP · u], u = short_job_weight + 1
— 0 with the whole budget left, u (more than any bonus plus waited/max_wait of a request that
is not forced) at half the budget, rising ever faster (to the cap) as slack runs out. So a
short job may overtake a long one only while the long one has more than half its TTFT budget;
scaled by max_wait instead, the pressure rose 0.2 over a 2 s target and short jobs overtook
long ones past their deadline (bench/results/ANALYSIS.md).
Requests are taken in the order (forced first, then class priority, then resumed, then score):
  * forced: waited >= max_wait — SLA protection, oldest first, ahead of every class;
  * class priority dominates the score (high before normal before low);
  * a request re-queued after a preemption or crash goes to the front of its class.
FIFO policies use (resumed first, arrival).
"""
from __future__ import annotations

from .config import PolicyConfig
from .types import Waiting


PRESSURE_CAP = 8.0   # pressure saturates at slack = T / 9: earliest deadline first until then


def deadline_of(req: Waiting, default_ttft_s: float = 0.0) -> float | None:
    """The earlier of the queue deadline and the request's TTFT target (its own, else
    `default_ttft_s` if > 0), absolute. Admission passes the config's default; ordering passes
    none, so only requests with their own target or a queue deadline feel deadline pressure."""
    ttft_s = req.ttft_target_s if req.ttft_target_s > 0 else default_ttft_s
    ttft = req.arrival_s + ttft_s if ttft_s > 0 else None
    if req.queue_deadline_s is None:
        return ttft
    return req.queue_deadline_s if ttft is None else min(ttft, req.queue_deadline_s)


def short_bonus(predicted_output: int, cfg: PolicyConfig) -> float:
    return cfg.short_job_weight / (1.0 + predicted_output / cfg.short_job_tokens)


def ttft_budget(req: Waiting, cfg: PolicyConfig) -> float:
    """The request's TTFT target (its own, else the config's): the scale of its pressure."""
    return req.ttft_target_s if req.ttft_target_s > 0 else cfg.ttft_target_s


def score(req: Waiting, predicted_output: int, now: float, cfg: PolicyConfig) -> float:
    urgency = (now - req.arrival_s) / cfg.max_wait_s
    pressure = deadline_pressure(deadline_of(req), now, cfg, ttft_budget(req, cfg))
    return urgency + pressure + short_bonus(predicted_output, cfg)


def deadline_pressure(deadline: float | None, now: float, cfg: PolicyConfig,
                      budget: float) -> float:
    """u · (budget / slack − 1) in [0, PRESSURE_CAP · u] (module docstring)."""
    if deadline is None:
        return 0.0
    unit, slack = cfg.short_job_weight + 1.0, deadline - now
    if slack * (PRESSURE_CAP + 1.0) <= budget:
        return PRESSURE_CAP * unit
    return unit * max(0.0, budget / slack - 1.0)


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
    forced (waited < 1, bonus <= weight, pressure <= cap · (weight + 1)), so the class and
    resumed offsets dominate it."""
    if cfg.ordering == "fifo":
        return req.arrival_s
    step = (PRESSURE_CAP + 1.0) * (cfg.short_job_weight + 1.0) + 2.0
    cls = req.priority if req.priority > 0 else 2
    return ((3 - cls) * 2 * step + (0.0 if req.resumed else step)
            + req.arrival_s / cfg.max_wait_s - short_bonus(predicted_output, cfg))


def key_at(base: float, deadline: float | None, now: float, cfg: PolicyConfig,
           budget: float) -> float:
    """base_key with the deadline pressure at `now` (priority ordering only)."""
    if deadline is None or cfg.ordering == "fifo":
        return base
    return base - deadline_pressure(deadline, now, cfg, budget)


def fifo_key(req: Waiting) -> tuple[bool, float]:
    """Arrival order, re-queued (resumed) requests first."""
    return (not req.resumed, req.arrival_s)
