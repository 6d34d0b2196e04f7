"""Discrete-event simulation of the scheduler + workers, driving the REAL batching policy.

The scheduler side does what scheduler_svc/batching.py's BatchingLoop does, in simulated time:
every arrival goes through ``policy.admit``; the loop wakes on arrivals and worker events (and
every ``tick_s`` while requests wait), calls ``policy.observe`` for each fresh worker feedback
(every ``feedback_s``, like WorkerConfig.heartbeat_s) and ``policy.decide`` when the queue is not
empty, then carries out the decision (assignments to workers, expiries). ``policy.on_finish`` is
called for every completion. Workers are :class:`SimWorker` (engine batching with a latency
model). All figures are SIMULATED: they are only as good as the latency model (its provenance is
carried into every result).
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from dynabatch.bench.latency_model import LatencyModel, load_model
from dynabatch.bench.metrics import Outcome, RequestRecord, RunResult, TimelineSample
from dynabatch.bench.simworker import Seq, SimWorker
from dynabatch.bench.traces import Trace, cap_lengths
from dynabatch.scheduler_svc.policy import (Assigned, PolicyConfig, Waiting, WorkerView,
                                            make_policy)


@dataclass
class SimConfig:
    policy: str = "dynamic"
    model: LatencyModel = field(default_factory=load_model)
    workers: int = 1
    ttft_target_s: float = 2.0       # SLA: time to first token
    tpot_target_s: float = 0.05      # SLA: mean time per output token after the first
    # max_tokens sent with each request: None = the trace's output length (what replay must send
    # with ignore_eos); a number = a client-side cap (the request still ends at the trace's
    # length, as at EOS) so the policy cannot read the true length off max_tokens.
    max_tokens: int | None = 2048
    max_queue_s: float | None = None  # queue TTL (requests waiting longer are expired)
    tick_s: float = 0.005             # BatchingLoop tick
    # Simulation shortcut: while nothing changes (no arrival, finish, feedback or assignment)
    # and decisions come back empty, the tick backs off (x2 per empty tick) up to this. Only
    # time-driven triggers (naive window, static timeout, max_wait forcing) can be this late.
    idle_tick_max_s: float = 0.05
    stop_after_misses: int | None = None  # end early once this many requests missed the SLA
    admission: bool = True            # False: accept every arrival (ablation of policy.admit)
    feedback_s: float = 0.25          # worker heartbeat / feedback period
    macro_steps: int = 16
    # The engine's --mixed-steps: decodes ride along prefill steps even with a model fitted to
    # the alternating engine (the dynamic policies' step prefill cap then applies).
    mixed_steps: bool = False
    policy_overrides: dict = field(default_factory=dict)
    drain_s: float = 3600.0           # stop this long after the last arrival (unfinished = miss)


def policy_config(cfg: SimConfig) -> PolicyConfig:
    base = PolicyConfig(ttft_target_s=cfg.ttft_target_s, tpot_target_s=cfg.tpot_target_s)
    return replace(base, **cfg.policy_overrides)


class Simulation:
    def __init__(self, trace: Trace, cfg: SimConfig) -> None:
        m = replace(cfg.model, alternate_prefill=False) if cfg.mixed_steps else cfg.model
        self.cfg = cfg = replace(cfg, model=m)
        self.trace = cap_lengths(trace, max_model_len=m.max_model_len)
        self.policy = make_policy(cfg.policy, policy_config(cfg))
        self.workers = [SimWorker(f"w{i}", m, cfg.macro_steps) for i in range(cfg.workers)]
        self.assigned: list[dict[str, Assigned]] = [{} for _ in self.workers]
        # (time, decode step ms, batch, steps, prefill tokens/s, step prefill cap)
        self.fb: list[tuple[float, float, float, int, float, int]] = [
            (0.0, 0.0, 0.0, 0, 0.0, 0)] * cfg.workers
        self.fb_used = [0] * cfg.workers
        self.views = [self._view(i, 0.0) for i in range(cfg.workers)]
        self.dirty = [False] * cfg.workers
        self.records = [RequestRecord(f"r{i}", r.arrival_s, r.prompt_tokens, r.output_tokens,
                                      cfg.ttft_target_s, cfg.tpot_target_s)
                        for i, r in enumerate(self.trace.requests)]
        self.waiting: dict[str, Waiting] = {}
        self._wlist: list[Waiting] | None = []
        self.heap: list[tuple[float, int, int, int]] = []
        self.timeline: list[TimelineSample] = []
        self._seq = 0
        self.in_system = 0
        self.area = 0.0          # integral of requests in system over time (Little's law)
        self.last_t = 0.0
        self.decides = 0
        self.changed = False
        self.stopped_early = False
        self.misses = 0
        self.reject_reasons: dict[str, int] = {}
        self.idle_streak = 0

    # ------------------------------------------------------------------ views
    def _view(self, w: int, now: float) -> WorkerView:
        t, step_ms, batch, steps, rate, cap = self.fb[w]
        m = self.cfg.model
        return WorkerView(worker_id=self.workers[w].worker_id, kv_blocks_total=m.kv_blocks_total,
                          kv_blocks_used=self.fb_used[w], kv_block_size=m.kv_block_size,
                          max_running=m.max_running, max_model_len=m.max_model_len,
                          decode_step_ms=step_ms, decode_batch_size=batch, steps=steps,
                          heartbeat_age_s=min(self.cfg.feedback_s, max(0.0, now - t)),
                          assigned=tuple(self.assigned[w].values()),
                          prefill_tokens_per_s=rate,
                          step_prefill_tokens=0 if m.alternate_prefill else cap or m.max_batch_tokens)

    def _waiting_list(self) -> list[Waiting]:
        if self._wlist is None:
            self._wlist = list(self.waiting.values())
        return self._wlist

    def _push(self, w: int, end: float | None) -> None:
        if end is not None:
            self._seq += 1
            heapq.heappush(self.heap, (end, self._seq, w, self.workers[w].version))

    def _count(self, now: float, delta: int) -> None:
        self.area += self.in_system * (now - self.last_t)
        self.last_t, self.in_system = now, self.in_system + delta

    # ------------------------------------------------------------------ events
    def _worker_done(self, w: int, now: float) -> None:
        worker = self.workers[w]
        done = worker.finish_plan(now)
        for s in done:
            rec = self.records[s.index]
            rec.first_token_s, rec.finish_s = s.first_token_s, now
            rec.outcome, rec.preemptions = Outcome.OK, s.preemptions
            self.misses += not rec.met
            del self.assigned[w][s.rid]
            self._count(now, -1)
            self.policy.on_finish(s.rid, s.prompt, s.generated, now)
        if done:
            self.dirty[w] = self.changed = True
        if self._sync_tokens(w):
            self.dirty[w] = True
        if now - self.fb[w][0] >= self.cfg.feedback_s or not worker.running():
            self._feedback(w, now)
        self._push(w, worker.start(now))

    def _sync_tokens(self, w: int) -> bool:
        """The scheduler's token counts of a worker's requests, as the relay keeps them (every
        token as it comes, not once a heartbeat); True if any changed."""
        table, changed = self.assigned[w], False
        for s in self.workers[w].decoding:
            a = table[s.rid]
            if a.generated_tokens != s.generated:
                table[s.rid] = replace(a, generated_tokens=s.generated,
                                       first_token_s=max(0.0, s.first_token_s))
                changed = True
        return changed

    def _feedback(self, w: int, now: float) -> None:
        """The worker's heartbeat: fresh measurements and KV usage (token counts are synced
        at every step, `_sync_tokens`)."""
        worker = self.workers[w]
        step_ms, batch = worker.take_feedback()
        self.fb[w] = (now, step_ms, batch, worker.steps, worker.prefill_rate, worker.prefill_cap)
        self.fb_used[w] = worker.used
        self.dirty[w], self.changed = False, True
        self.views[w] = view = self._view(w, now)
        self.policy.observe(view, now)
        self.timeline.append(TimelineSample(now, worker.worker_id, batch, worker.running(),
                                            worker.used / self.cfg.model.kv_blocks_total,
                                            len(self.waiting), len(worker.queue),
                                            worker.preemptions))

    def _views(self, now: float) -> list[WorkerView]:
        for w, dirty in enumerate(self.dirty):
            if dirty:
                self.views[w], self.dirty[w] = self._view(w, now), False
        return self.views

    def _arrive(self, i: int, now: float) -> None:
        rec, cfg = self.records[i], self.cfg
        max_tokens = rec.output_tokens if cfg.max_tokens is None else max(
            rec.output_tokens, min(cfg.max_tokens, cfg.model.max_model_len - rec.prompt_tokens))
        req = Waiting(request_id=rec.request_id, prompt_tokens=rec.prompt_tokens,
                      max_tokens=max_tokens, arrival_s=now, ttft_target_s=cfg.ttft_target_s,
                      tpot_target_s=cfg.tpot_target_s,
                      queue_deadline_s=None if cfg.max_queue_s is None else now + cfg.max_queue_s)
        adm = (self.policy.admit(req, self._waiting_list(), self._views(now), now)
               if cfg.admission else None)
        if adm is not None and not adm.accepted:
            rec.outcome = Outcome.REJECTED
            self.reject_reasons[adm.reason] = self.reject_reasons.get(adm.reason, 0) + 1
            self.misses += 1
            return
        self.changed = True
        self.waiting[req.request_id] = req
        self._wlist = None
        self._count(now, +1)

    def _decide(self, now: float) -> bool:
        """Run the policy once; True when it did anything (assigned or expired)."""
        self.decides += 1
        # A live worker heartbeats every feedback_s even when idle: the age never exceeds it.
        views = [replace(v, heartbeat_age_s=min(self.cfg.feedback_s, max(0.0, now - self.fb[w][0])))
                 for w, v in enumerate(self._views(now))]
        d = self.policy.decide(self._waiting_list(), views, now)
        for rid in d.expired:
            if self.waiting.pop(rid, None) is not None:
                self.records[int(rid[1:])].outcome = Outcome.EXPIRED
                self.misses += 1
                self._count(now, -1)
                self._wlist = None
        index = {v.worker_id: w for w, v in enumerate(self.views)}
        for worker_id, cap in d.step_prefill_tokens.items():
            self.workers[index[worker_id]].prefill_cap = min(cap, self.cfg.model.max_batch_tokens)
        for worker_id, ids in d.assignments.items():
            w, touched = index[worker_id], False
            for rid in ids:
                req = self.waiting.pop(rid, None)
                if req is None:
                    continue
                self._wlist, touched = None, True
                i = int(rid[1:])
                rec = self.records[i]
                rec.assigned_s = now
                self.assigned[w][rid] = Assigned(
                    rid, req.prompt_tokens, d.predicted_output_tokens.get(rid) or req.max_tokens,
                    0, d.bins.get(rid, 0))
                self.workers[w].add(Seq(rid, i, rec.prompt_tokens, rec.output_tokens))
            if touched:
                self.dirty[w] = True
                self._push(w, self.workers[w].cut(now))
        return bool(d.expired) or any(d.assignments.values())

    def run(self, progress: Callable[[int, int], None] | None = None) -> RunResult:
        reqs, n, i = self.trace.requests, len(self.trace.requests), 0
        horizon = (reqs[-1].arrival_s if reqs else 0.0) + self.cfg.drain_s
        next_tick, inf = math.inf, math.inf
        wall = time.perf_counter()
        now = 0.0
        while True:
            t_arr = reqs[i].arrival_s if i < n else inf
            t_w = self.heap[0][0] if self.heap else inf
            now = min(t_arr, t_w, next_tick if self.waiting else inf)
            if now == inf or now > horizon:
                break
            while self.heap and self.heap[0][0] <= now:
                _, _, w, version = heapq.heappop(self.heap)
                if version == self.workers[w].version and self.workers[w].plan is not None:
                    self._worker_done(w, now)
            while i < n and reqs[i].arrival_s <= now:
                self._arrive(i, now)
                i += 1
                if progress is not None and i % 2000 == 0:
                    progress(i, n)
            if self.waiting and (self.changed or now >= next_tick):
                acted, self.changed = self._decide(now), False
                self.idle_streak = 0 if acted else self.idle_streak + 1
                next_tick = now + min(self.cfg.tick_s * 2 ** min(self.idle_streak, 20),
                                      max(self.cfg.idle_tick_max_s, self.cfg.tick_s))
            limit = self.cfg.stop_after_misses
            if limit is not None and self.misses >= limit:
                self.stopped_early = True
                break
        self._count(now if now != inf else self.last_t, 0)
        return RunResult(
            records=self.records, timeline=self.timeline, label=self.cfg.policy,
            meta={"simulated": True, "latency_model": self.cfg.model.name,
                  "provenance": self.cfg.model.provenance, "trace": self.trace.source,
                  "trace_notes": self.trace.notes, "workers": self.cfg.workers,
                  "requests": n, "wall_s": time.perf_counter() - wall, "decides": self.decides,
                  "stopped_early": self.stopped_early, "reject_reasons": self.reject_reasons,
                  "steps": sum(w.steps for w in self.workers),
                  "preemptions": sum(w.preemptions for w in self.workers),
                  "busy_s": sum(w.busy_ms for w in self.workers) / 1000.0,
                  "in_system_area": self.area})


def simulate(trace: Trace, cfg: SimConfig,
             progress: Callable[[int, int], None] | None = None) -> RunResult:
    return Simulation(trace, cfg).run(progress)
