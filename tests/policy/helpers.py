"""Builders for policy tests: workers and requests with sensible defaults."""
from __future__ import annotations

from dynabatch.scheduler_svc.policy import Assigned, Waiting, WorkerView


def worker(worker_id: str = "w0", *, total: int = 1000, used: int = 0, block: int = 16,
           max_running: int = 256, max_model_len: int = 8192, step_ms: float = 0.0,
           batch: float = 0.0, steps: int = 0, age: float = 0.0, accepting: bool = True,
           assigned: tuple[Assigned, ...] = ()) -> WorkerView:
    return WorkerView(worker_id, total, used, block, max_running, max_model_len, step_ms, batch,
                      steps, age, accepting, assigned)


def req(rid: str, *, prompt: int = 64, max_tokens: int = 64, at: float = 0.0, prio: int = 2,
        hint: int = 0, ttft: float = 0.0, tpot: float = 0.0, deadline: float | None = None,
        resumed: bool = False) -> Waiting:
    return Waiting(rid, prompt, max_tokens, at, prio, hint, ttft, tpot, deadline, resumed)


def running(n: int, *, prompt: int = 64, predicted: int = 64, generated: int = 0,
            bin_: int = 0, prefix: str = "run") -> tuple[Assigned, ...]:
    return tuple(Assigned(f"{prefix}{i}", prompt, predicted, generated, bin_) for i in range(n))


def sent(decision) -> list[str]:
    """Every request id the decision assigns, in worker order then send order."""
    return [rid for ids in decision.assignments.values() for rid in ids]
