"""PagedEngine: the Engine protocol (api.py) over the scheduler, the runner and the sampler."""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.api import EngineStats, SequenceRequest, TokenOutput
from dynabatch.worker_svc.engine.kv_cache import KVCache
from dynabatch.worker_svc.engine.runner import ModelRunner
from dynabatch.worker_svc.engine.sampler import RowSampling, Sampler
from dynabatch.worker_svc.engine.scheduler import PrefillChunk, Scheduler
from dynabatch.worker_svc.engine.sequence import Sequence

_WINDOW = 64  # steps the rolling stats average over


@dataclass(frozen=True)
class StepRecord:
    """What the last step ran and how long it took (wall clock, host sync included)."""
    kind: Literal["prefill", "decode"]
    tokens: int            # tokens computed (the batch size in a decode step)
    context_tokens: int    # sum over the batch of tokens in cache after the step
    seconds: float


class PagedEngine:
    """Continuous batching with chunked prefill over a paged KV cache.

    Emitted token ids include the stop token that ended a request (EOS or a stop id).
    """

    def __init__(self, model: PreTrainedModel, kv: KVCache, device: torch.device, *,
                 max_running: int, prefill_token_budget: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], cuda_graphs: bool, compile_decode: bool,
                 seed: int) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.max_model_len = min(max_model_len, kv.max_tokens)
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(kv, max_running, prefill_token_budget)
        self.runner = ModelRunner(model, kv, device, max_running, self.max_model_len, cuda_graphs,
                                  compile_decode)
        self.sampler = Sampler(device, seed)
        self._arrivals = itertools.count()
        self._pending: list[TokenOutput] = []
        self._decode_times: deque[tuple[float, int]] = deque(maxlen=_WINDOW)
        self._prefill_times: deque[tuple[float, int]] = deque(maxlen=_WINDOW)
        self.steps = 0
        self.startup_s = 0.0  # set by build_engine
        self.last_step: StepRecord | None = None

    # -- Engine protocol -------------------------------------------------------------------
    def add(self, request: SequenceRequest) -> None:
        if not request.prompt_token_ids:
            raise ValueError(f"{request.request_id}: empty prompt")
        total = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if total > self.max_model_len:
            raise ValueError(f"{request.request_id}: {total} tokens exceed max_model_len "
                             f"{self.max_model_len}")
        if self.scheduler.find(request.request_id) is not None:
            raise ValueError(f"{request.request_id}: already queued")
        seq = Sequence(request, next(self._arrivals), self.eos_token_ids)
        if seq.num_output >= request.max_tokens or total >= self.max_model_len:
            self._pending.append(TokenOutput(request.request_id, [], seq.num_output, "length"))
            return
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.drop(seq)
        return True

    def has_work(self) -> bool:
        return bool(self._pending) or self.scheduler.has_work()

    def step(self) -> list[TokenOutput]:
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        t0 = time.perf_counter()
        if isinstance(batch[0], PrefillChunk):
            chunks: list[PrefillChunk] = batch  # type: ignore[assignment]
            logits = self.runner.prefill(chunks)
            for c in chunks:
                c.seq.num_computed = c.end
            done = [c.seq for c in chunks if c.wants_logits]
            outputs += self._sample(logits, done)
            dt = time.perf_counter() - t0
            n = sum(c.end - c.start for c in chunks)
            self._prefill_times.append((dt, n))
            self.last_step = StepRecord("prefill", n, sum(c.end for c in chunks), dt)
        else:
            seqs: list[Sequence] = batch  # type: ignore[assignment]
            logits = self.runner.decode(seqs)
            for s in seqs:
                s.num_computed += 1
            outputs += self._sample(logits, seqs)
            dt = time.perf_counter() - t0
            self._decode_times.append((dt, len(seqs)))
            self.last_step = StepRecord("decode", len(seqs), sum(s.num_computed for s in seqs), dt)
        self.steps += 1
        return outputs

    def stats(self) -> EngineStats:
        dec = list(self._decode_times)
        pre = list(self._prefill_times)
        pre_s = sum(t for t, _ in pre)
        alloc = self.kv.allocator
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_total=alloc.total, kv_blocks_used=alloc.used,
            kv_block_size=self.kv.block_size,
            decode_step_ms=1e3 * sum(t for t, _ in dec) / len(dec) if dec else 0.0,
            decode_batch_size=sum(n for _, n in dec) / len(dec) if dec else 0.0,
            prefill_tokens_per_s=sum(n for _, n in pre) / pre_s if pre_s > 0 else 0.0,
            max_model_len=self.max_model_len, max_running=self.scheduler.max_running,
            steps=self.steps, preemptions=self.scheduler.preemptions)

    # -- internals -------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenOutput]:
        if not seqs:
            return []
        random_rows = {i: RowSampling(s.req.sampling, s.num_output)
                       for i, s in enumerate(seqs) if s.req.sampling.temperature > 0}
        tokens = self.sampler(logits, random_rows).tolist()   # the step's one host sync
        outputs = []
        max_len = self.max_model_len
        for seq, tok in zip(seqs, tokens):
            toks = seq.tokens
            offset = len(toks) - seq.num_prompt
            toks.append(tok)
            reason = None
            if tok in seq.stop_ids:
                reason = "stop"
            elif offset + 1 >= seq.req.max_tokens or len(toks) >= max_len:
                reason = "length"
            if reason is not None:
                self.scheduler.drop(seq)
            outputs.append(TokenOutput(seq.req.request_id, [tok], offset, reason))
        return outputs
