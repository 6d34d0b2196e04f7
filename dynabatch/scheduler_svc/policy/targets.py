"""Each worker's batch target per bin: fixed (baselines) or b_target = min(b_mem, b_SLA) (rule 3),
with b_mem from Algorithm 1 (memory.py) and b_SLA from that (worker, bin)'s Algorithm 2
controller (sla.py). Never above the hard cap min(b_max, the worker's max_running).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .config import PolicyConfig
from .memory import b_mem, blocks_per_seq
from .slots import clamp_bin
from .types import Waiting, WorkerView

# Planned tokens (prompt + predicted output) and request counts per bin.
Sample = tuple[list[float], list[int]]


@dataclass
class Targets:
    per_bin: dict[int, int]
    b_mem: dict[int, int] = field(default_factory=dict)    # dynamic only
    b_sla: dict[int, int] = field(default_factory=dict)


def hard_cap(w: WorkerView, cfg: PolicyConfig) -> int:
    return min(cfg.b_max, w.max_running) if w.max_running > 0 else cfg.b_max


def queue_sample(live: Sequence[Waiting], predict: Callable[[Waiting], tuple[int, int]],
                 num_bins: int, size: int = 256) -> Sample:
    """Planned tokens per bin over the first `size` waiting requests (cheap, and the queue's
    head is what will run next)."""
    total, count = [0.0] * num_bins, [0] * num_bins
    for r in live[:size]:
        pred, b = predict(r)
        total[b] += r.prompt_tokens + pred
        count[b] += 1
    return total, count


def mean_tokens(sample: Sample, w: WorkerView, num_bins: int) -> list[float]:
    """Mean planned tokens per bin over the worker's assigned requests and the queue sample:
    Alg. 1's blocks/seq "from predicted lengths" (a bin with none gets the overall mean)."""
    total, count = list(sample[0]), list(sample[1])
    for a in w.assigned:
        b = clamp_bin(a.bin, num_bins)
        total[b] += a.prompt_tokens + a.predicted_output_tokens
        count[b] += 1
    overall = sum(total) / max(sum(count), 1)
    return [total[b] / count[b] if count[b] else max(overall, 1.0) for b in range(num_bins)]


def fixed_targets(w: WorkerView, cfg: PolicyConfig) -> Targets:
    """fcfs: max_num_seqs; static: B; window: b_max — each within the hard cap."""
    cap = {"continuous": cfg.max_num_seqs, "static": cfg.static_batch_size,
           "window": cfg.b_max}[cfg.batching]
    return Targets({b: min(cap, hard_cap(w, cfg)) for b in range(cfg.num_bins)})


def dynamic_targets(w: WorkerView, cfg: PolicyConfig, sample: Sample,
                    b_sla: Callable[[int], int]) -> Targets:
    """min(b_mem, b_SLA) per bin. With one bin, blocks/seq is measured (used / running) once
    enough sequences run, as in the paper; per bin it comes from the bin's predicted lengths
    (a worker's measured usage mixes bins)."""
    per_bin = mean_tokens(sample, w, cfg.num_bins)
    out = Targets({})
    for b in range(cfg.num_bins):
        predicted = max(per_bin[b] / w.kv_block_size, 1.0)
        per_seq = (blocks_per_seq(w, predicted, cfg.few_running) if cfg.num_bins == 1
                   else predicted)
        out.b_mem[b] = b_mem(w.kv_blocks_total, cfg.eta, per_seq, len(w.assigned), cfg.b_min,
                             cfg.b_max)
        out.b_sla[b] = b_sla(b)
        out.per_bin[b] = min(out.b_mem[b], out.b_sla[b], hard_cap(w, cfg))
    return out
