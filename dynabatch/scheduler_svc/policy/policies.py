"""BatchingPolicy: the one implementation behind every policy name (config.PRESETS).

decide() in four steps: expire, refresh the controllers from fresh feedback, compute each
eligible worker's batch targets (fixed, or Alg. 1 + 2 per bin), then hand out requests in the
policy's order to the worker with the most headroom. Pure: time is the `now` argument.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from . import admission
from .bins import BinBoundaries
from .config import PolicyConfig, preset
from .predict import HistoryPredictor, LengthPredictor
from .prefill_cap import slack_tokens, step_prefill_tokens
from .priority import base_key, deadline_of, fifo_key, key_at, ttft_budget
from .sla import SlaController
from .slots import WorkerSlot, clamp_bin, dominant_bin, eligible
from .targets import Sample, dynamic_targets, fixed_targets, hard_cap, queue_sample
from .types import Admission, Decision, Waiting, WorkerView

_Entry = tuple[int, int, float, float | None, float]  # pred, bin, key, deadline, TTFT


class BatchingPolicy:
    def __init__(self, name: str, config: PolicyConfig,
                 predictor: LengthPredictor | None = None) -> None:
        c = self.config = config
        self.name = name
        self.predictor: LengthPredictor = predictor or HistoryPredictor(
            c.predict_quantile, c.predict_min_samples, c.history_size, c.bin_refresh)
        self.bins = BinBoundaries(c.num_bins, c.history_size, c.bin_refresh)
        self.controllers: dict[tuple[str, int], SlaController] = {}
        self.targets: dict[str, int] = {}        # last b_target per worker (admission estimates)
        self.rates = admission.ServiceRate(c.admission_smoothing_s)
        self.mean_output = 0.0                   # EWMA of completed output lengths
        self._steps: dict[str, int] = {}
        self._tpot: dict[str, float] = {}        # own TPOT targets of assigned requests
        self._window_start: dict[tuple[str, ...], float] = {}   # naive, per worker set
        self._cache: dict[str, _Entry] = {}
        self._cache_version = (-1, -1)
        self._queue_stats: tuple[object, admission.QueueStats] = (None,
                                                                  admission.QueueStats.of(()))

    # ---- feedback -------------------------------------------------------------------------
    def observe(self, worker: WorkerView, now: float) -> None:
        """On a fresh measurement (steps advanced): the admission service-rate estimate, and
        (dynamic) the Alg. 2 update, only for a non-empty batch, of
        the controller of every bin present in the worker's batch: each learns "a batch of this
        size, with me in it, met / missed the TPOT target". Crediting only the majority bin let
        the others ride free (their targets stayed at the start of the band while the batch
        missed): in the simulator (llama-1B latency model, TPOT 4 ms, 80 req/s) multibin's
        goodput went from 27.5 to 36.7 req/s with this (dynamic: 29.6)."""
        last = self._steps.get(worker.worker_id)
        if last is not None and worker.steps <= last:
            return
        self._steps[worker.worker_id] = worker.steps
        self.rates.update(worker, self.targets.get(worker.worker_id), now)
        if self.config.controller != "dynamic":
            return
        if worker.decode_step_ms <= 0 or worker.decode_batch_size <= 0 or worker.steps <= 0:
            return
        k = self.config.num_bins
        present = {clamp_bin(a.bin, k) for a in worker.assigned} or {0}
        target = self.tpot_target(worker)
        # The controlled quantity is what b_target caps, the requests assigned to the worker;
        # the decode batch lags it while assigned requests wait for prefill (README).
        batch = max(worker.decode_batch_size, float(len(worker.assigned)))
        for bin_ in sorted(present):
            self.controller(worker.worker_id, bin_).update(
                worker.decode_step_ms / 1000.0, batch, target)

    def tpot_target(self, worker: WorkerView) -> float:
        """The batch's TPOT target: the tightest among its requests (their own or the default)."""
        return self._tightest([a.request_id for a in worker.assigned])

    def _tightest(self, request_ids: list[str]) -> float:
        default = self.config.tpot_target_s
        return min((self._tpot.get(i, default) for i in request_ids), default=default)

    def on_finish(self, request_id: str, prompt_tokens: int, output_tokens: int,
                  now: float) -> None:
        self.predictor.observe(prompt_tokens, output_tokens)
        self.bins.observe(prompt_tokens if self.config.bin_key == "prompt" else output_tokens)
        self.mean_output = (output_tokens if self.mean_output == 0
                            else 0.95 * self.mean_output + 0.05 * output_tokens)
        self._cache.pop(request_id, None)
        self._tpot.pop(request_id, None)

    def controller(self, worker_id: str, bin_: int) -> SlaController:
        key = (worker_id, bin_)
        ctl = self.controllers.get(key)
        if ctl is None:
            c = self.config
            ctl = self.controllers[key] = SlaController(c.b_min, c.b_max, c.eps, c.alpha, c.delta,
                                                          c.sla_step)
        return ctl

    # ---- admission ------------------------------------------------------------------------
    def admit(self, req: Waiting, waiting: Sequence[Waiting], workers: Sequence[WorkerView],
              now: float) -> Admission:
        """Admission control (admission.py). The queue's statistics are kept while `waiting`
        is the same list object, and extended by what was appended to it since (the scheduler
        passes one snapshot per tick and appends each request it admits), so a burst of
        arrivals costs O(1) each, not O(queue). A list that shrank is counted again."""
        self._sync_cache()
        seen, stats = self._queue_stats
        if seen is not waiting or stats.length > len(waiting):
            stats = admission.QueueStats.of(waiting)
        elif stats.length < len(waiting):
            stats = stats.extended(waiting)
        self._queue_stats = (waiting, stats)
        predicted = self.predict(req)[0]
        return admission.admit(req, predicted, stats, workers, self.targets,
                               self.rates, self.mean_output or predicted, now, self.config)

    # ---- decision -------------------------------------------------------------------------
    def predict(self, req: Waiting) -> tuple[int, int]:
        """(predicted output tokens, bin) of a request."""
        e = self._entry(req)
        return e[0], e[1]

    def _entry(self, req: Waiting) -> _Entry:
        """Per-request facts cached until the prediction or bin tables change."""
        hit = self._cache.get(req.request_id)
        if hit is None:
            c = self.config
            pred = self.predictor.predict(req.prompt_tokens, req.max_tokens,
                                          req.expected_output_tokens)
            bin_ = self.bins.bin_of(req.prompt_tokens if c.bin_key == "prompt" else pred)
            hit = (pred, bin_, base_key(req, pred, c), deadline_of(req), ttft_budget(req, c))
            self._cache[req.request_id] = hit
        return hit

    def _sync_cache(self) -> None:
        """Drop cached per-request facts when the tables change, or when requests that left
        without on_finish (cancelled, expired) have piled up past twice the queue bound (not
        the current queue's size: the scheduler decides per model, on parts of the queue)."""
        version = (self.predictor.version, self.bins.version)
        if (version != self._cache_version
                or len(self._cache) > 2 * self.config.max_queue_requests + 1024):
            self._cache.clear()
            self._cache_version = version

    def decide(self, waiting: Sequence[Waiting], workers: Sequence[WorkerView],
               now: float) -> Decision:
        c = self.config
        decision = Decision()
        self._sync_cache()
        if len(self._tpot) > 4096:              # drop requests whose finish was never reported
            running = {a.request_id for w in workers for a in w.assigned}
            self._tpot = {k: v for k, v in self._tpot.items() if k in running}
        for w in workers:
            self.observe(w, now)
        live: list[Waiting] = []
        for r in waiting:
            if r.queue_deadline_s is not None and r.queue_deadline_s <= now:
                decision.expired.append(r.request_id)
            else:
                live.append(r)
        sample = queue_sample(live, self.predict, c.num_bins)
        slots = [self._slot(w, sample, decision) for w in workers if eligible(w, c)]
        if c.batching == "continuous":
            if live and (any(s.open() for s in slots) or self._any_forced(live, now)):
                self._fill(live, slots, now, decision)
        else:                                   # run to completion: idle workers only
            slots = [s for s in slots if not s.worker.assigned]
            pool = tuple(sorted(w.worker_id for w in workers))
            self._fill_batches(live, slots, pool, now, decision)
        for s in slots:
            if s.taken:
                decision.assignments[s.worker.worker_id] = s.taken
        if c.controller == "dynamic" and c.sla_prefill:
            for s in slots:
                cap = self._step_cap(s, now)
                if cap:
                    decision.step_prefill_tokens[s.worker.worker_id] = cap
        return decision

    def _step_cap(self, slot: WorkerSlot, now: float) -> int:
        """The step prefill cap for a worker (0: none to send). Its engine must take one (an
        alternating engine reports 0), and it must have requests, those sent now included,
        whose tightest TPOT target sets the cap. An idle worker keeps its cap: the default
        target (50 ms) would raise it for the next request to arrive, whose own target may be
        far tighter (live, session 16: caps of 700-1,340 tokens at the start of busy spells
        against ~64 at the requests' 8.7 ms). The cap is the larger of the step rule and what
        the decoding requests' TPOT budgets leave (prefill_cap.py)."""
        w = slot.worker
        ids = [a.request_id for a in w.assigned] + slot.taken
        if w.step_prefill_tokens <= 0 or not ids:
            return 0
        c, tightest = self.config, self._tightest(ids)
        cap = step_prefill_tokens(w.decode_step_ms, w.prefill_tokens_per_s,
                                  w.step_prefill_tokens, tightest, c.eps)
        if c.step_cap_horizon_s <= 0:
            return cap
        horizon_steps = c.step_cap_horizon_s / (tightest * (1.0 - c.eps))
        return max(cap, slack_tokens(self._budgets(w), now, w.decode_step_ms,
                                     w.prefill_tokens_per_s, horizon_steps))

    def _budgets(self, w: WorkerView) -> list[tuple[float, int, int, float]]:
        """slack_tokens' view of a worker's requests that have their first token."""
        c = self.config
        return [(self._tpot.get(a.request_id, c.tpot_target_s) * (1.0 - c.eps),
                 a.generated_tokens, a.predicted_output_tokens, a.first_token_s)
                for a in w.assigned if a.generated_tokens > 0]

    def _any_forced(self, live: list[Waiting], now: float) -> bool:
        c = self.config
        return c.ordering == "priority" and min(r.arrival_s for r in live) <= now - c.max_wait_s

    def _batch_due(self, head: list[Waiting], waiting: int, pool: tuple[str, ...],
                   now: float) -> bool:
        """static: B waiting or the oldest waited static_timeout_s; window: the window opened by
        the oldest request waiting since the last dispatch has closed (seed 000's naive).
        `head` is the start of the queue in arrival order, `waiting` the queue's length, `pool`
        the workers decide() was given (one window per pool: the scheduler decides per model)."""
        c = self.config
        if not head:
            return False
        oldest = min(r.arrival_s for r in head)
        if c.batching == "static":
            return waiting >= c.static_batch_size or now - oldest >= c.static_timeout_s
        start = self._window_start.setdefault(pool, oldest)
        return now - start >= c.naive_window_s

    def _slot(self, w: WorkerView, sample: Sample, decision: Decision) -> WorkerSlot:
        c = self.config
        if c.controller == "fixed":
            t = fixed_targets(w, c)
        else:
            t = dynamic_targets(w, c, sample, lambda b: self.controller(w.worker_id, b).b_sla)
        main = dominant_bin(w, c.num_bins) or 0
        decision.batch_targets[w.worker_id] = self.targets[w.worker_id] = t.per_bin[main]
        if t.b_mem:
            decision.b_mem[w.worker_id], decision.b_sla[w.worker_id] = t.b_mem[main], t.b_sla[main]
        if c.num_bins > 1:
            decision.bin_targets.update({(w.worker_id, b): n for b, n in t.per_bin.items()})
        budget = c.prefill_token_budget if c.batching == "continuous" else 1 << 62
        typical = sum(sample[0]) / max(sum(sample[1]), 1) / max(w.kv_block_size, 1)
        return WorkerSlot(w, t.per_bin, hard_cap(w, c), c.reserve_output, budget, typical)

    def _fill(self, live: list[Waiting], slots: list[WorkerSlot], now: float,
              decision: Decision) -> None:
        """Continuous batching: top up every worker, requests in policy order, each to the
        worker with the most headroom that fits it. Forced requests (past max_wait) come first,
        oldest first, and only memory or the hard cap stops them; one that does not fit holds
        the worker with the most free KV (nothing else goes there) so that memory drains for it
        and no request waits unboundedly behind smaller ones. FCFS never lets a later request
        overtake.
        Beyond the first ones only the head of the order is looked at (4 × room + 16):
        O(n log k), and whatever did not fit is looked at again next decision."""
        c = self.config
        firsts: list[Waiting] = []
        keys: list[float] = []
        rest: list[Waiting] = []
        cache, entry = self._cache, self._entry
        fifo, cutoff = c.ordering == "fifo", now - c.max_wait_s
        for r in live:
            e = cache.get(r.request_id) or entry(r)
            if r.resumed if fifo else r.arrival_s <= cutoff:        # priority.first, inlined
                firsts.append(r)
            else:
                keys.append(e[2] if e[3] is None else key_at(e[2], e[3], now, c, e[4]))
                rest.append(r)
        room = sum(s.room() for s in slots)
        firsts.sort(key=lambda r: r.arrival_s)
        head = heapq.nsmallest(4 * room + 16, range(len(keys)), key=keys.__getitem__)
        for r in itertools.chain(firsts, (rest[i] for i in head)):
            force = not fifo and r.arrival_s <= cutoff
            open_slots = [s for s in slots if not s.held]
            if not open_slots or (not force and not any(s.open() for s in open_slots)):
                break                            # forced ones sort first: none are left
            if self._place(r, open_slots, force, decision):
                continue
            if fifo:
                break
            if force:                            # hold the roomiest worker until it fits
                max(open_slots, key=lambda s: s.free_blocks).held = True

    def _fill_batches(self, live: list[Waiting], slots: list[WorkerSlot], pool: tuple[str, ...],
                      now: float, decision: Decision) -> None:
        """static / window: whole batches in arrival order, each to an idle worker, when due."""
        head = heapq.nsmallest(4 * sum(s.room() for s in slots) + 16, live, key=fifo_key)
        left = len(live)
        for s in sorted(slots, key=lambda s: s.headroom(0), reverse=True):
            if not self._batch_due(head, left, pool, now):
                break
            rest = []
            for r in head:
                if not (s.open() and self._place(r, [s], False, decision)):
                    rest.append(r)
            left -= len(head) - len(rest)
            if len(rest) < len(head):
                self._window_start.pop(pool, None)
            head = rest

    def _place(self, r: Waiting, slots: list[WorkerSlot], force: bool,
               decision: Decision) -> bool:
        pred, bin_ = self.predict(r)
        fitting = [s for s in slots if s.fits(r.prompt_tokens, pred, bin_, force)]
        if not fitting:
            return False
        best = max(fitting, key=lambda s: s.headroom(bin_))
        best.take(r.request_id, r.prompt_tokens, pred, bin_)
        self._cache.pop(r.request_id, None)     # if it comes back (resumed) its key differs
        decision.predicted_output_tokens[r.request_id] = pred
        decision.bins[r.request_id] = bin_
        if r.tpot_target_s > 0:
            self._tpot[r.request_id] = r.tpot_target_s
        return True


def make_policy(name: str, config: PolicyConfig | None = None) -> BatchingPolicy:
    """The policy `name` (one of POLICY_NAMES) on `config`; ValueError for an unknown name."""
    return BatchingPolicy(name, preset(name, config))

