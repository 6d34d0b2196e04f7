"""A simulated worker: the engine's batching (admission, chunked prefill, decode, KV blocks,
preemption by recompute) with step times from a :class:`LatencyModel`.

It mirrors the real engine contract (worker_svc/engine/api.py): requests queue at the worker, join
the running batch while ``max_running`` and the KV pool allow (first come first served), are
prefilled in chunks of at most ``max_batch_tokens`` per step alongside the decodes (or, for a
model with ``alternate_prefill``, like this project's engine, in prefill-only steps that
alternate with decode-only steps), and hold
``ceil((prompt + generated) / block_size)`` blocks. When decodes outgrow the pool, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of
the worker's queue to be prefilled again (prompt + tokens generated so far). A step prefill cap
from the policy (`prefill_cap`, policy/prefill_cap.py) bounds the prompt tokens of a step that
carries decodes, as the real engine's `set_step_prefill_tokens`; the worker reports the prefill
rate it is set from.

Speed: a step changes nothing but token counts unless a sequence joins, finishes or needs a new
block, so consecutive decode-only steps are applied together ("macro step", at most one block
boundary per sequence). A macro step is cut short at the next step boundary when new work
arrives, exactly as a real worker picks up work between steps.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dynabatch.bench.latency_model import LatencyModel
from dynabatch.worker_svc.engine.api import RATE_MIN_TOKENS, STATS_WINDOW


@dataclass(slots=True, eq=False)
class Seq:
    rid: str
    index: int              # position in the simulator's request records
    prompt: int
    target: int             # output tokens this request will produce (the trace's length)
    generated: int = 0
    to_prefill: int = 0     # tokens still to prefill in the current admission
    prefix: int = 0         # tokens already prefilled in the current admission
    blocks: int = 0
    first_token_s: float = -1.0
    preemptions: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated


def _blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


@dataclass
class Plan:
    start: float
    cum_ms: list[float]                          # cumulative time after step j (1-based: [j-1])
    chunks: list[tuple[Seq, int]] = field(default_factory=list)   # prefill (single-step plans)
    batch: int = 0                               # decoding sequences that advance

    @property
    def k(self) -> int:
        return len(self.cum_ms)

    @property
    def end(self) -> float:
        return self.start + self.cum_ms[-1] / 1000.0


class SimWorker:
    def __init__(self, worker_id: str, model: LatencyModel, macro_steps: int = 16) -> None:
        self.worker_id, self.m = worker_id, model
        self.bs = model.kv_block_size
        self.k_max = max(1, min(macro_steps, self.bs))
        self.queue: deque[Seq] = deque()
        self.prefilling: list[Seq] = []
        self.decoding: list[Seq] = []
        self.used = 0
        self.plan: Plan | None = None
        self.version = 0
        self.steps = 0
        self.preemptions = 0
        self.busy_ms = 0.0
        self.last_was_prefill = False
        self.prefill_cap = 0             # prompt tokens per step from the policy (0: none)
        self.prefill_rate = 0.0          # prompt tokens/s of the last step of >= 256 of them
        # Recent decode-only steps as (ms per step, batch, steps): EngineStats' rolling window.
        self.decodes: deque[tuple[float, int, int]] = deque()
        self.decode_steps = 0

    # ------------------------------------------------------------------ planning
    def add(self, seq: Seq) -> None:
        seq.to_prefill = seq.tokens
        self.queue.append(seq)

    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def _admit(self) -> None:
        free = self.m.kv_blocks_total - self.used
        while self.queue and self.running() < self.m.max_running:
            seq = self.queue[0]
            need = _blocks(seq.to_prefill + 1, self.bs)
            if need > free:
                break
            self.queue.popleft()
            seq.blocks, seq.prefix = need, 0
            free -= need
            self.used += need
            self.prefilling.append(seq)

    def _preempt_latest(self) -> None:
        seq = self.decoding.pop() if self.decoding else self.prefilling.pop()
        self.used -= seq.blocks
        seq.blocks, seq.to_prefill, seq.prefix = 0, seq.tokens, 0
        seq.preemptions += 1
        self.preemptions += 1
        self.queue.appendleft(seq)

    def _growth_steps(self) -> list[int]:
        """For each decoding sequence, the step (1..bs) at which it needs its next block."""
        return sorted((-s.tokens) % self.bs + 1 for s in self.decoding)

    def start(self, now: float) -> float | None:
        """Plan the next (macro) step from ``now``; its end time, or None when idle."""
        self._admit()
        while self.decoding:  # the first step must fit: preempt until every decode has a block
            growth = self._growth_steps()
            if sum(1 for j in growth if j == 1) <= self.m.kv_blocks_total - self.used:
                break
            self._preempt_latest()
        if not self.running():
            self.plan = None
            return None
        alt = self.m.alternate_prefill
        if self.prefilling and (not alt or not self.decoding or not self.last_was_prefill):
            plan = self._prefill_plan(now, decodes=not alt)
        else:
            plan = self._decode_plan(now, single=alt and bool(self.prefilling))
        self.last_was_prefill = bool(plan.chunks)
        self.plan = plan
        self.version += 1
        return plan.end

    def _prefill_plan(self, now: float, decodes: bool) -> Plan:
        """One step of prefill chunks (up to max_batch_tokens), with the decodes if ``decodes``."""
        m = self.m
        b = len(self.decoding) if decodes else 0
        ctx = sum(s.tokens for s in self.decoding) if decodes else 0
        # the cap bounds a decode's time between tokens: a step without decodes takes it all
        budget = (self.prefill_cap if b else 0) or max(0, m.max_batch_tokens - b)
        chunks, toks, attn = [], 0, 0.0
        for s in self.prefilling:
            t = min(budget, s.to_prefill - s.prefix)
            if t <= 0:
                break
            chunks.append((s, t))
            budget -= t
            toks += t
            attn += t * (s.prefix + t / 2)
            ctx += s.prefix  # the chunk reads the KV of its already-prefilled prefix
        return Plan(now, [m.step_ms(b, ctx, toks, attn)], chunks, b)

    def _decode_plan(self, now: float, single: bool) -> Plan:
        """Decode-only steps: a macro step of up to k_max (1 when ``single``)."""
        m, b = self.m, len(self.decoding)
        ctx = sum(s.tokens for s in self.decoding)
        k = 1 if single else min(self.k_max, min(s.target - s.generated for s in self.decoding))
        growth, free = self._growth_steps(), m.kv_blocks_total - self.used
        if len(growth) > free and growth[free] - 1 < k:
            k = growth[free] - 1
        one = m.base_ms + m.loop_ms + m.per_seq_ms * b + m.per_ctx_ms * ctx
        cum, acc = [], 0.0
        for j in range(k):
            acc += one + m.per_ctx_ms * b * j
            cum.append(acc)
        return Plan(now, cum, [], b)

    def cut(self, now: float) -> float | None:
        """New work arrived at ``now``: end the current macro step at the next step boundary.
        Returns the new end time when the plan changed (the caller reschedules), else None."""
        p = self.plan
        if p is None:
            return self.start(now)
        if now <= p.start:
            return self.start(now)
        n = next((j + 1 for j, c in enumerate(p.cum_ms) if p.start + c / 1000.0 >= now), p.k)
        if n >= p.k:
            return None
        del p.cum_ms[n:]
        self.version += 1
        return p.end

    # ------------------------------------------------------------------ completion
    def finish_plan(self, now: float) -> list[Seq]:
        """Apply the planned steps (ending at ``now``); return the sequences that finished."""
        p = self.plan
        assert p is not None
        k, bs = p.k, self.bs
        self.steps += k
        self.busy_ms += p.cum_ms[-1]
        if not p.chunks:
            self._record_decodes(p.cum_ms[-1] / k, p.batch, k)
        if p.batch:
            for s in self.decoding:
                s.generated += k
        used_delta = 0
        prompt = sum(t for _, t in p.chunks)
        if prompt >= RATE_MIN_TOKENS:      # as the engine measures it
            self.prefill_rate = prompt * 1000.0 / p.cum_ms[-1]
        for s, t in p.chunks:
            s.prefix += t
            if s.prefix >= s.to_prefill:   # prefill done: it yields the next token
                self.prefilling.remove(s)
                s.generated += 1
                if s.first_token_s < 0:
                    s.first_token_s = now
                self.decoding.append(s)
        done: list[Seq] = []
        keep: list[Seq] = []
        for s in self.decoding:
            nb = _blocks(s.tokens, bs)
            if nb > s.blocks:
                used_delta += nb - s.blocks
                s.blocks = nb
            (done if s.generated >= s.target else keep).append(s)
        self.decoding = keep
        self.used += used_delta
        for s in done:
            self.used -= s.blocks
            s.blocks = 0
        self.plan = None
        return done

    def _record_decodes(self, ms: float, batch: int, k: int) -> None:
        self.decodes.append((ms, batch, k))
        self.decode_steps += k
        while self.decode_steps - self.decodes[0][2] >= STATS_WINDOW:
            self.decode_steps -= self.decodes.popleft()[2]

    def take_feedback(self) -> tuple[float, float]:
        """Mean ms and batch of the recent decode-only steps, as the engine reports them
        (EngineStats.decode_step_ms: a mixed step is a prefill step and counts in neither)."""
        n = self.decode_steps
        if not n:
            return 0.0, 0.0
        return (sum(ms * k for ms, _, k in self.decodes) / n,
                sum(b * k for _, b, k in self.decodes) / n)
