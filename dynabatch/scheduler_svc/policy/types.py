"""What the policy sees and what it returns: plain frozen dataclasses, no I/O.

Times are seconds on the scheduler's clock (the `now` argument of every call); the policy never
reads a clock itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Waiting:
    """A queued request, as the policy sees it."""
    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_s: float
    priority: int = 2                   # 1 low, 2 normal, 3 high (proto Priority; 0 means 2)
    expected_output_tokens: int = 0     # client hint; 0 = none
    ttft_target_s: float = 0.0          # 0 = config default
    tpot_target_s: float = 0.0          # 0 = config default
    queue_deadline_s: float | None = None   # absolute; past it the request is expired
    resumed: bool = False               # re-queued after preemption/crash: front of its class


@dataclass(frozen=True)
class Assigned:
    """A request the scheduler assigned to a worker and has not yet seen finish."""
    request_id: str
    prompt_tokens: int
    predicted_output_tokens: int
    generated_tokens: int
    bin: int = 0
    first_token_s: float = 0.0          # when its first token was made (0: none yet, or unknown)


@dataclass(frozen=True)
class WorkerView:
    """A worker's last feedback plus what the scheduler knows it runs."""
    worker_id: str
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int
    max_running: int
    max_model_len: int
    decode_step_ms: float       # mean of recent decode steps (measured)
    decode_batch_size: float    # mean batch size of those steps
    steps: int                  # increases when the worker has stepped (fresh measurement)
    heartbeat_age_s: float
    accepting: bool = True
    assigned: tuple[Assigned, ...] = ()
    prefill_tokens_per_s: float = 0.0   # measured on steps of >= 256 prompt tokens
    step_prefill_tokens: int = 0        # the engine's cap on a step's prompt tokens (0: it
    #                                     takes none: steps alternate, no mixed steps)


@dataclass
class Decision:
    """One run of the policy: what to send where, and the figures behind it (for metrics)."""
    assignments: dict[str, list[str]] = field(default_factory=dict)  # worker -> ids, in order
    batch_targets: dict[str, int] = field(default_factory=dict)      # worker -> b_target
    expired: list[str] = field(default_factory=list)                 # past queue deadline
    predicted_output_tokens: dict[str, int] = field(default_factory=dict)  # assigned ids only
    bins: dict[str, int] = field(default_factory=dict)                     # assigned ids only
    b_mem: dict[str, int] = field(default_factory=dict)               # worker -> Alg. 1 bound
    b_sla: dict[str, int] = field(default_factory=dict)               # worker -> Alg. 2 bound
    # (worker, bin) -> b_target of that bin on that worker (multi-bin policies only).
    bin_targets: dict[tuple[str, int], int] = field(default_factory=dict)
    # worker -> prompt tokens one engine step may prefill (prefill_cap.py; dynamic policies).
    step_prefill_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Admission:
    """Whether a new request may join the queue."""
    accepted: bool
    reason: str = ""            # "" | "queue_full" | "deadline_unmeetable"
    retry_after_s: float = 0.0


class Policy(Protocol):
    name: str

    def admit(self, req: Waiting, waiting: Sequence[Waiting], workers: Sequence[WorkerView],
              now: float) -> Admission: ...

    def decide(self, waiting: Sequence[Waiting], workers: Sequence[WorkerView],
               now: float) -> Decision: ...

    def observe(self, worker: WorkerView, now: float) -> None: ...

    def on_finish(self, request_id: str, prompt_tokens: int, output_tokens: int,
                  now: float) -> None: ...
