"""The engine contract: what the worker loop needs from whatever runs the model.

The worker loop (worker_svc/loop.py) only ever calls these methods, always from one thread at a
time (it runs `step` in a worker thread so the event loop stays responsive).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]
# EngineStats.prefill_tokens_per_s is measured on steps of at least this many prompt tokens: a
# smaller step's time is mostly the weights' read (a decode step's), not a per-token cost.
RATE_MIN_TOKENS = 256
# EngineStats' decode step and prefill rate average over this many recent steps.
STATS_WINDOW = 64


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; temperature 0 means greedy."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class SequenceRequest:
    """One request handed to the engine."""
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Higher runs first and is preempted last.
    priority: int = 0
    # Output tokens produced by an earlier attempt: the engine continues after them (they count
    # towards max_tokens and are not emitted again).
    resume_token_ids: list[int] = field(default_factory=list)


@dataclass
class TokenOutput:
    """What one request produced in one step."""
    request_id: str
    token_ids: list[int]
    # Index of token_ids[0] in the request's output (resume tokens count).
    offset: int
    finish_reason: FinishReason | None = None


@dataclass
class EngineStats:
    """Measured figures the worker reports as feedback (never synthetic)."""
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_size: int
    decode_step_ms: float          # mean wall time of recent decode steps
    decode_batch_size: float       # mean batch size of those steps
    prefill_tokens_per_s: float    # recent prefill throughput (steps of >= RATE_MIN_TOKENS)
    max_model_len: int
    max_running: int
    steps: int
    preemptions: int
    step_prefill_tokens: int = 0   # prefill tokens per step now (0: no such limit)


class Engine(Protocol):
    def add(self, request: SequenceRequest) -> None:
        """Queue a request; it joins the running batch at a later step (prefill)."""

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False if unknown."""

    def set_step_prefill_tokens(self, n: int) -> None:
        """Prompt tokens a step may prefill from now on (the scheduler's SLA cap; 0: the
        engine's own maximum)."""

    def step(self) -> list[TokenOutput]:
        """Run one engine step (admit/prefill and/or decode); return every request's new tokens."""

    def has_work(self) -> bool:
        """True while any request is waiting or running."""

    def stats(self) -> EngineStats:
        """Current measured figures."""
