"""Which sequences run in the next step: chunked-prefill admission, decode, preemption."""
from __future__ import annotations

from dataclasses import dataclass

from dynabatch.worker_svc.engine.kv_cache import KVCache
from dynabatch.worker_svc.engine.sequence import Sequence


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int
    decode: bool = False      # a running sequence's next token, riding along (mixed steps)

    @property
    def wants_logits(self) -> bool:
        """The chunk reaches the last known token, so its logits give the next one."""
        return self.end == len(self.seq.tokens)


class Scheduler:
    """Waiting and running queues over one KV pool.

    Steps alternate between a prefill step (chunks of waiting or partly prefilled sequences,
    at most `token_budget` tokens) and a decode step (one token for every running sequence that
    is fully prefilled) whenever both kinds of work exist, so neither starves. With `mixed`, a
    step with prefill work also carries every decode as a one-token chunk, as vLLM's chunked
    prefill does: a decoding sequence then waits for no prefill step of its own, and a small
    `token_budget` keeps its time between tokens near a decode step's. A new sequence is
    admitted only if its whole prompt fits with one free block per running sequence still in
    reserve (its prefill may still run in chunks of the token budget), so decodes rarely
    preempt; when they must, the lowest-priority, latest-arrived running sequence is preempted
    by recompute.
    """

    def __init__(self, kv: KVCache, max_running: int, token_budget: int,
                 mixed: bool = False) -> None:
        self.kv = kv
        self.alloc = kv.allocator
        self.block_size = kv.block_size
        self.max_running = max_running
        self.token_budget = token_budget     # prefill tokens per step (decode tokens not counted)
        self.max_budget = token_budget       # the configured budget: mixed steps' cap is at most it
        self.mixed = mixed
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._last_was_prefill = False
        self._free_rows = list(range(max_running - 1, -1, -1))

    def set_step_cap(self, n: int) -> None:
        """Mixed steps only: prompt tokens per step that carries decodes, at most the configured
        budget (0: the budget)."""
        if self.mixed:
            self.token_budget = min(n, self.max_budget) if n > 0 else self.max_budget

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for s in self.running + self.waiting:
            if s.request_id == request_id:
                return s
        return None

    def drop(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.row >= 0:
            self.running.remove(seq)
            self._release_row(seq)
        else:
            self.waiting.remove(seq)
        seq.table.release(self.alloc)

    def _release_row(self, seq: Sequence) -> None:
        self._free_rows.append(seq.row)
        seq.row, seq.synced = -1, 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[PrefillChunk] | list[Sequence]:
        """Prefill chunks, or sequences to decode, or [] when nothing can run."""
        prefilling = sum(1 for s in self.running if len(s.tokens) - s.num_computed > 1)
        decodable = prefilling < len(self.running)
        prefill_work = prefilling > 0 or (self.waiting and len(self.running) < self.max_running)
        if prefill_work and self.mixed:
            return self._schedule_mixed(decodable)
        if prefill_work and (not decodable or not self._last_was_prefill):
            chunks = self._schedule_prefill(self.token_budget)
            if chunks:
                self._last_was_prefill = True
                return chunks
        self._last_was_prefill = False
        return self._schedule_decode() if decodable else []

    def _schedule_mixed(self, decodable: bool) -> list[PrefillChunk] | list[Sequence]:
        """Every decode (blocks first: it may preempt) as a one-token chunk, then prefill chunks
        of up to the budget; a plain decode step if no prefill chunk fits. The budget (the step
        prefill cap) bounds the time between a decoding sequence's tokens, so a step with no
        decode takes the configured maximum: it delays no token, and a smaller chunk would
        only add steps to the prompts' time to first token."""
        decodes = self._schedule_decode() if decodable else []
        chunks = self._schedule_prefill(self.token_budget if decodes else self.max_budget)
        if not chunks:
            return decodes
        return [PrefillChunk(s, s.num_computed, s.num_computed + 1, decode=True)
                for s in decodes] + chunks

    def _schedule_prefill(self, budget: int) -> list[PrefillChunk]:
        chunks: list[PrefillChunk] = []
        for seq in sorted((s for s in self.running if s.needs_prefill), key=Sequence.sort_key):
            chunk = self._fit(seq, budget, reserve=0)
            if chunk is None:
                break
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        self.waiting.sort(key=Sequence.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            if not self._whole_prompt_fits(self.waiting[0], reserve=len(self.running)):
                break
            chunk = self._fit(self.waiting[0], budget, reserve=len(self.running))
            if chunk is None:
                break
            seq = self.waiting.pop(0)
            seq.row = self._free_rows.pop()
            self.running.append(seq)
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        return chunks

    def _whole_prompt_fits(self, seq: Sequence, reserve: int) -> bool:
        """Admit a sequence only if all its prompt fits beside the reserve: admitted on a
        partial chunk when memory is short, it would hold blocks it cannot complete, and the
        next decode needing a block would preempt it (the latest arrival) to recompute later."""
        need = -(-len(seq.tokens) // self.block_size) - len(seq.table.blocks)
        return need <= self.alloc.free - reserve

    def _fit(self, seq: Sequence, budget: int, reserve: int) -> PrefillChunk | None:
        """The longest chunk of seq's missing tokens that fits the budget and the free blocks."""
        room = seq.table.capacity(self.block_size) - seq.num_computed
        room += max(0, self.alloc.free - reserve) * self.block_size
        n = min(len(seq.tokens) - seq.num_computed, budget, room)
        if n <= 0:
            return None
        end = seq.num_computed + n
        if not seq.table.ensure(self.alloc, end, self.block_size):
            raise RuntimeError("block accounting out of step with the allocator")
        return PrefillChunk(seq, seq.num_computed, end)

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        bs = self.block_size
        for seq in sorted((s for s in self.running if len(s.tokens) - s.num_computed == 1),
                          key=Sequence.sort_key):
            if seq.row < 0:                    # preempted earlier in this loop
                continue
            if seq.num_computed < len(seq.table.blocks) * bs:   # room in its last block
                scheduled.append(seq)
                continue
            while not seq.table.ensure(self.alloc, seq.num_computed + 1, self.block_size):
                victim = max(self.running, key=Sequence.sort_key)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_row(seq)
        seq.table.release(self.alloc)
        seq.num_computed = 0
        self.waiting.append(seq)
        self.preemptions += 1
