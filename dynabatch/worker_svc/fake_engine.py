"""A model-free engine for scheduler tests and the load benchmark (`--engine fake`).

It follows the Engine contract exactly (admission up to max_running, KV blocks held per token,
max_tokens / stop ids, abort) but "generates" token t_i = (prompt_len + i) % vocab without a
model, so the rest of the stack can be driven far faster than any real engine. Its step times are
real wall-clock times of its own (trivial) steps: it never pretends to be a GPU.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from dynabatch.worker_svc.engine.api import EngineStats, SequenceRequest, TokenOutput


@dataclass
class _Seq:
    req: SequenceRequest
    output: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.req.prompt_token_ids) + len(self.output)


class FakeEngine:
    def __init__(self, *, vocab: int = 256, max_running: int = 256, num_kv_blocks: int = 100_000,
                 block_size: int = 16, max_model_len: int = 1 << 20, eos_token_id: int | None = None,
                 step_delay_s: float = 0.0, crash_token_id: int | None = None) -> None:
        self.vocab, self.max_running, self.block_size = vocab, max_running, block_size
        self.num_kv_blocks, self.max_model_len, self.eos = num_kv_blocks, max_model_len, eos_token_id
        self.step_delay_s = step_delay_s
        # Chaos tests: a prompt holding this token id kills the process when first stepped (a
        # stand-in for a request that crashes any worker running it: a poison request).
        self.crash_token_id = crash_token_id
        self.waiting: list[_Seq] = []
        self.running: dict[str, _Seq] = {}
        self._steps = 0
        self._step_ms = 0.0
        self._batch = 0.0

    @property
    def inline_step(self) -> bool:
        """Steps are trivial (no delay): the worker runs them on its event loop, no thread hop."""
        return not self.step_delay_s

    def _blocks(self, seq: _Seq) -> int:
        return -(-(seq.tokens + 1) // self.block_size)

    def _used(self) -> int:
        return sum(self._blocks(s) for s in self.running.values())

    def add(self, request: SequenceRequest) -> None:
        seq = _Seq(request, list(request.resume_token_ids))
        self.waiting.append(seq)

    def set_step_prefill_tokens(self, n: int) -> None:
        """No prefill here: like an alternating engine it takes no cap (and reports none)."""

    def abort(self, request_id: str) -> bool:
        if self.running.pop(request_id, None) is not None:
            return True
        before = len(self.waiting)
        self.waiting = [s for s in self.waiting if s.req.request_id != request_id]
        return len(self.waiting) != before

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[TokenOutput]:
        start = time.perf_counter()
        used = self._used()
        while self.waiting and len(self.running) < self.max_running:
            need = self._blocks(self.waiting[0])
            if used + need > self.num_kv_blocks:
                break
            seq = self.waiting.pop(0)
            if self.crash_token_id is not None and self.crash_token_id in seq.req.prompt_token_ids:
                os._exit(70)
            self.running[seq.req.request_id] = seq
            used += need
        outputs = [self._advance(seq) for seq in list(self.running.values())]
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self._steps += 1
        self._step_ms = (time.perf_counter() - start) * 1000
        self._batch = len(outputs)
        return outputs

    def _advance(self, seq: _Seq) -> TokenOutput:
        offset = len(seq.output)
        token = (len(seq.req.prompt_token_ids) + offset) % self.vocab
        seq.output.append(token)
        reason = None
        if token in seq.req.stop_token_ids or (token == self.eos and not seq.req.ignore_eos):
            reason = "stop"
        elif len(seq.output) >= seq.req.max_tokens:
            reason = "length"
        if reason:
            del self.running[seq.req.request_id]
        return TokenOutput(seq.req.request_id, [token], offset, reason)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=len(self.waiting),
                           kv_blocks_total=self.num_kv_blocks, kv_blocks_used=self._used(),
                           kv_block_size=self.block_size, decode_step_ms=self._step_ms,
                           decode_batch_size=self._batch, prefill_tokens_per_s=0.0,
                           max_model_len=self.max_model_len, max_running=self.max_running,
                           steps=self._steps, preemptions=0)
