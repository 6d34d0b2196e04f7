"""Per-request state inside the engine."""
from __future__ import annotations

from dynabatch.worker_svc.engine.api import SequenceRequest
from dynabatch.worker_svc.engine.kv_cache import BlockTable


class Sequence:
    """A request's tokens and how many of them have K/V in the cache.

    `tokens` is prompt + resumed output + new output. The sequence needs prefill while more than
    one token lacks K/V; with exactly one missing (the last sampled token) it decodes. Preemption
    by recompute just drops the blocks and sets `num_computed` back to 0: the whole token list is
    prefilled again on readmission, and sampling continues where it stopped. While a decode step
    is in flight, its token is a negative placeholder at the end of `tokens` (engine.py).
    """

    __slots__ = ("req", "arrival", "tokens", "num_prompt", "num_computed", "table", "stop_ids",
                 "row", "synced", "done")

    def __init__(self, req: SequenceRequest, arrival: int, eos_ids: tuple[int, ...]) -> None:
        self.req = req
        self.arrival = arrival
        self.tokens = list(req.prompt_token_ids) + list(req.resume_token_ids)
        self.num_prompt = len(req.prompt_token_ids)
        self.num_computed = 0
        self.table = BlockTable()
        stop = set(req.stop_token_ids)
        if not req.ignore_eos:
            stop.update(eos_ids)
        self.stop_ids = frozenset(stop)
        self.row = -1      # row in the device block table while running (decode_inputs.py)
        self.synced = 0    # how many of its blocks that row already holds
        self.done = False  # finished or aborted: a step still in flight skips it

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def needs_prefill(self) -> bool:
        return len(self.tokens) - self.num_computed > 1

    def sort_key(self) -> tuple[int, int]:
        """Ascending = scheduled first: higher priority, then earlier arrival."""
        return (-self.req.priority, self.arrival)
