"""A small discrete-time model of workers, to drive a policy through a sustained load.

Each worker decodes one token per running sequence per step; a step takes D(b) = a + c·b ms,
which is also what it reports as feedback. KV blocks grow with generated tokens; when they
outgrow the pool the newest sequence is preempted and goes back to the queue (resumed).
Deterministic for a given seed. Test scaffolding only: the real simulator lives in bench/.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable

from dynabatch.scheduler_svc.policy import Assigned, Policy, Waiting, WorkerView
from dynabatch.scheduler_svc.policy.memory import blocks


@dataclass
class Seq:
    req: Waiting
    true_output: int
    predicted: int
    bin: int
    generated: int = 0


@dataclass
class SimWorker:
    worker_id: str
    total: int = 2000
    block: int = 16
    max_running: int = 256
    a_ms: float = 10.0
    c_ms: float = 0.3
    running: list[Seq] = field(default_factory=list)
    clock: float = 0.0          # time owed to the current step, s
    steps: int = 0
    last_batch: int = 0

    def used(self) -> int:
        return sum(blocks(s.req.prompt_tokens + s.generated, self.block) for s in self.running)

    def step_ms(self, b: int) -> float:
        return self.a_ms + self.c_ms * b

    def view(self) -> WorkerView:
        return WorkerView(self.worker_id, self.total, self.used(), self.block, self.max_running,
                          8192, self.step_ms(self.last_batch) if self.steps else 0.0,
                          float(self.last_batch), self.steps, 0.0, True,
                          tuple(Assigned(s.req.request_id, s.req.prompt_tokens, s.predicted,
                                         s.generated, s.bin) for s in self.running))


@dataclass
class Result:
    waits: dict[str, float]              # request id -> first assignment time − arrival
    finished: set[str]
    arrived: list[Waiting]
    preemptions: int
    max_running: int


def workload(seed: int, rate: float, horizon: float) -> list[tuple[Waiting, int]]:
    """Poisson arrivals: (request, true output length)."""
    rng, t, out, i = random.Random(seed), 0.0, [], 0
    while True:
        t += rng.expovariate(rate)
        if t > horizon:
            return out
        true_out = rng.choice([rng.randint(4, 64), rng.randint(64, 512)])
        out.append((Waiting(f"r{i}", rng.randint(16, 512), 512, t, rng.randint(1, 3)), true_out))
        i += 1


def run(policy: Policy, arrivals: list[tuple[Waiting, int]], workers: list[SimWorker],
        until: float, dt: float = 0.02, on_tick: Callable[[float], None] | None = None) -> Result:
    """Drive `policy` until `until` (s); `on_tick(now)` runs after every tick (probes, changes)."""
    pending = sorted(arrivals, key=lambda x: x[0].arrival_s)
    truth = {r.request_id: n for r, n in pending}
    waiting: dict[str, Waiting] = {}
    res = Result({}, set(), [r for r, _ in pending], 0, 0)
    by_id = {w.worker_id: w for w in workers}
    now, nxt = 0.0, 0
    while now < until:
        while nxt < len(pending) and pending[nxt][0].arrival_s <= now:
            r = pending[nxt][0]
            waiting[r.request_id] = r
            nxt += 1
        views = [w.view() for w in workers]
        d = policy.decide(list(waiting.values()), views, now)
        for rid in d.expired:
            waiting.pop(rid)
        for wid, ids in d.assignments.items():
            for rid in ids:
                r = waiting.pop(rid)
                res.waits.setdefault(rid, now - r.arrival_s)
                by_id[wid].running.append(Seq(r, truth[rid], d.predicted_output_tokens[rid],
                                              d.bins[rid]))
        for w in workers:
            res.max_running = max(res.max_running, len(w.running))
            _advance(w, dt, policy, now, waiting, res)
        if on_tick is not None:
            on_tick(now)
        now += dt
    return res


def _advance(w: SimWorker, dt: float, policy: Policy, now: float, waiting: dict[str, Waiting],
             res: Result) -> None:
    w.clock += dt
    while w.running and w.clock >= w.step_ms(len(w.running)) / 1000:
        w.clock -= w.step_ms(len(w.running)) / 1000
        w.last_batch, w.steps = len(w.running), w.steps + 1
        for s in w.running:
            s.generated += 1
        done = [s for s in w.running if s.generated >= s.true_output]
        w.running = [s for s in w.running if s.generated < s.true_output]
        for s in done:
            res.finished.add(s.req.request_id)
            policy.on_finish(s.req.request_id, s.req.prompt_tokens, s.true_output, now)
        while w.used() > w.total:                      # prediction was short: preempt newest
            s = w.running.pop()
            res.preemptions += 1
            waiting[s.req.request_id] = replace(s.req, resumed=True)
    if not w.running:
        w.clock = 0.0
