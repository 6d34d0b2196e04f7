"""Per-decision state of one eligible worker: what it may still take (rule 8: dispatch to the
worker with the most headroom; never to a stale or draining one).

Capacity is counted in units of each bin's batch target: a sequence of bin k costs 1 / b_target_k,
and a worker takes new sequences while the sum stays <= 1. With one bin that is simply
running + 1 <= b_target; with several, a mixed batch is bounded by each bin's own target in
proportion to its share (seed 002's per-bin controllers, applied to continuous batching).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import PolicyConfig
from .memory import committed_blocks, reservation
from .types import WorkerView

_TOL = 1e-9


def eligible(worker: WorkerView, cfg: PolicyConfig) -> bool:
    """Accepting, heartbeat fresh, and has reported its KV pool."""
    return (worker.accepting and worker.heartbeat_age_s <= cfg.stale_heartbeat_s
            and worker.kv_blocks_total > 0 and worker.kv_block_size > 0)


def clamp_bin(bin_: int, num_bins: int) -> int:
    """A bin from elsewhere (another policy, a restart) mapped into [0, num_bins)."""
    return min(max(bin_, 0), num_bins - 1)


def dominant_bin(worker: WorkerView, num_bins: int) -> int | None:
    """The bin most of the worker's assigned requests belong to (lowest on ties)."""
    if not worker.assigned:
        return None
    counts = Counter(clamp_bin(a.bin, num_bins) for a in worker.assigned)
    return max(sorted(counts), key=lambda b: counts[b])


@dataclass
class WorkerSlot:
    worker: WorkerView
    targets: dict[int, int]          # bin -> b_target on this worker
    hard_cap: int                    # min(b_max, max_running): never exceeded, even when forced
    reserve_output: bool
    prefill_budget: int
    typical_blocks: float = 1.0      # a typical request's reservation (sizes the scan)
    free_blocks: int = 0
    running: int = 0
    load: float = 0.0                # sum of 1 / b_target over its sequences
    dominant: int | None = None
    held: bool = False               # kept free for an older forced request that did not fit
    taken: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        w, k = self.worker, len(self.targets)
        self.free_blocks = w.kv_blocks_total - committed_blocks(w, self.reserve_output)
        self.running = len(w.assigned)
        self.load = sum(1.0 / self.target(clamp_bin(a.bin, k)) for a in w.assigned)
        self.dominant = dominant_bin(w, k)

    def target(self, bin_: int) -> int:
        return max(1, self.targets.get(bin_, self.targets.get(0, 1)))

    def blocks_for(self, prompt_tokens: int, predicted: int) -> int:
        return reservation(prompt_tokens, predicted, 0, self.worker, self.reserve_output)

    def fits(self, prompt_tokens: int, predicted: int, bin_: int, forced: bool) -> bool:
        """Room for one more: KV reservation and the hard cap always; the batch target and this
        decision's prefill budget unless `forced` (past max_wait: only memory may stop it)."""
        if self.running >= self.hard_cap:
            return False
        if self.blocks_for(prompt_tokens, predicted) > self.free_blocks:
            return False
        if forced:
            return True
        if self.load + 1.0 / self.target(bin_) > 1.0 + _TOL:
            return False
        return not self.taken or prompt_tokens <= self.prefill_budget

    def take(self, request_id: str, prompt_tokens: int, predicted: int, bin_: int) -> None:
        self.free_blocks -= self.blocks_for(prompt_tokens, predicted)
        self.running += 1
        self.load += 1.0 / self.target(bin_)
        self.prefill_budget -= prompt_tokens
        self.taken.append(request_id)
        if self.dominant is None:
            self.dominant = bin_

    def open(self) -> bool:
        """Might still take a non-forced request."""
        return (self.running < self.hard_cap and self.load < 1.0 - _TOL and self.free_blocks > 0
                and (not self.taken or self.prefill_budget > 0))

    def room(self) -> int:
        """About how many more non-forced sequences it may take (sizes the candidate list)."""
        share = int((1.0 - self.load) * self.target(self.dominant or 0)) + 1
        kv = int(self.free_blocks / max(self.typical_blocks, 1.0)) + 1
        return max(0, min(self.hard_cap - self.running, share, kv))

    def headroom(self, bin_: int) -> tuple[bool, float, float]:
        """Larger is better: same bin as its batch (multi-bin), free batch share, free KV share."""
        return (self.dominant in (None, bin_), 1.0 - self.load,
                self.free_blocks / self.worker.kv_blocks_total)
