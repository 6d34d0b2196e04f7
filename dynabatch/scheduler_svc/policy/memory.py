"""Algorithm 1 (arXiv 2503.05248): the memory-aware batch bound, and the hard KV budget.

b_mem = floor(total_blocks * eta / blocks_per_seq), clamped to [max(running, b_min), b_max].
blocks_per_seq comes from the worker's measured usage (used / running, as the paper's vLLM
patch does) once enough sequences run, else from predicted lengths. Independently of b_mem, a
request is only sent where its reservation (prompt + predicted output blocks) fits next to the
reservations of everything already assigned there: the worker never has to hold more than its
KV pool if the predictions hold (when they do not, it preempts and the scheduler re-queues).
"""
from __future__ import annotations

import math

from .types import Assigned, WorkerView


def blocks(tokens: int, block_size: int) -> int:
    """KV blocks that hold `tokens` tokens."""
    return -(-max(tokens, 0) // max(block_size, 1))


def reservation(prompt_tokens: int, predicted_output: int, generated: int, worker: WorkerView,
                reserve_output: bool) -> int:
    """Blocks to plan for one sequence on `worker`: prompt plus predicted output (or, without
    output reservation, what it has generated so far), at most the model length and the pool
    (so a lone request always fits an empty worker)."""
    out = max(predicted_output, generated) if reserve_output else generated
    tokens = prompt_tokens + out
    if worker.max_model_len > 0:
        tokens = min(tokens, worker.max_model_len)
    return min(blocks(tokens, worker.kv_block_size), worker.kv_blocks_total)


def assigned_reservation(a: Assigned, worker: WorkerView, reserve_output: bool) -> int:
    return reservation(a.prompt_tokens, a.predicted_output_tokens, a.generated_tokens, worker,
                       reserve_output)


def committed_blocks(worker: WorkerView, reserve_output: bool) -> int:
    """Blocks already spoken for: the larger of what the worker reports in use and the sum of
    the reservations of the requests assigned to it (those not yet admitted use none yet)."""
    planned = sum(assigned_reservation(a, worker, reserve_output) for a in worker.assigned)
    return max(worker.kv_blocks_used, planned)


def blocks_per_seq(worker: WorkerView, predicted_blocks: float, few_running: int) -> float:
    """Measured blocks per running sequence (the paper's used / len(running)) when at least
    `few_running` run and report usage; else the predicted mean reservation."""
    running = len(worker.assigned)
    if running >= few_running and worker.kv_blocks_used > 0:
        return worker.kv_blocks_used / running
    return max(predicted_blocks, 1.0)


def b_mem(total_blocks: int, eta: float, per_seq: float, running: int, b_min: int,
          b_max: int) -> int:
    """Algorithm 1: floor(total * eta / blocks_per_seq) clamped to [max(running, b_min), b_max]."""
    raw = math.floor(total_blocks * eta / max(per_seq, 1e-9))
    return min(max(raw, running, b_min), b_max)
