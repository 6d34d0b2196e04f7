"""Capacity: the highest arrival rate a policy sustains at >= 99% SLA attainment (simulated).

The trace keeps its shape (burstiness, lengths) and is rescaled to each probed mean rate. The
search doubles the rate until attainment drops below the goal, then bisects the bracket until it
is narrower than ``rel_tol``. Attainment is assumed to fall with load (it need not, strictly;
every probed point is kept so a non-monotone curve shows in the report).
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

from dynabatch.bench.metrics import summarize
from dynabatch.bench.simulator import SimConfig, simulate
from dynabatch.bench.traces import Trace, to_rps

Progress = Callable[[str, float, dict], None]


@dataclass
class CapacityResult:
    policy: str
    capacity_rps: float                      # 0 when even the lowest probe failed
    goal: float
    points: list[dict] = field(default_factory=list)   # summaries of every probe, by rate

    def to_json(self) -> dict:
        return {"policy": self.policy, "capacity_rps": self.capacity_rps, "goal": self.goal,
                "points": self.points}


def run_at(trace: Trace, cfg: SimConfig, rps: float, goal: float | None = None) -> dict:
    """Summary of one simulation of ``trace`` rescaled to ``rps`` mean arrivals per second.
    With ``goal``, the run stops as soon as more requests missed than the goal allows (the
    verdict is then certain; the summary says ``stopped_early`` and its rates are partial)."""
    if goal is not None:
        cfg = replace(cfg, stop_after_misses=math.floor((1 - goal) * len(trace)) + 1)
    s = summarize(simulate(to_rps(trace, rps), cfg))
    s["target_rps"] = rps
    return s


def search(trace: Trace, cfg: SimConfig, goal: float = 0.99, start_rps: float = 1.0,
           rel_tol: float = 0.04, max_probes: int = 16, min_rps: float = 0.05,
           progress: Progress | None = None) -> CapacityResult:
    points: list[dict] = []

    def ok(rps: float) -> bool:
        s = run_at(trace, cfg, rps, goal)
        points.append(s)
        if progress:
            progress(cfg.policy, rps, s)
        return s["sla_attainment"] >= goal

    lo, hi, rps = 0.0, math.inf, start_rps
    while len(points) < max_probes and rps >= min_rps:
        if ok(rps):
            lo = rps
            if hi < math.inf:
                break
            rps *= 2
        else:
            hi = rps
            if lo > 0:
                break
            rps /= 2
    while lo > 0 and hi < math.inf and (hi - lo) / lo > rel_tol and len(points) < max_probes:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    points.sort(key=lambda p: p["target_rps"])
    return CapacityResult(cfg.policy, lo, goal, points)


def _search_job(args: tuple) -> CapacityResult:
    trace, cfg, kwargs = args
    return search(trace, cfg, **kwargs)


def search_policies(trace: Trace, cfg: SimConfig, policies: list[str], jobs: int = 1,
                    progress: Progress | None = None, **kwargs) -> dict[str, CapacityResult]:
    """Capacity of each policy; ``jobs`` > 1 searches policies in parallel processes (then the
    per-probe progress callback is replaced by one call per finished policy)."""
    cfgs = [replace(cfg, policy=p) for p in policies]
    if jobs <= 1:
        return {c.policy: search(trace, c, progress=progress, **kwargs) for c in cfgs}
    out: dict[str, CapacityResult] = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for res in pool.map(_search_job, [(trace, c, kwargs) for c in cfgs]):
            out[res.policy] = res
            if progress:
                progress(res.policy, res.capacity_rps, {"done": True})
    return out
