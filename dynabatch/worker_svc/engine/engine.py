"""PagedEngine: the Engine protocol (api.py) over the scheduler, the runner and the sampler."""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.api import (RATE_MIN_TOKENS, STATS_WINDOW, EngineStats,
                                             SequenceRequest, TokenOutput)
from dynabatch.worker_svc.engine.decode_inputs import HostBuffers
from dynabatch.worker_svc.engine.kv_cache import KVCache
from dynabatch.worker_svc.engine.prefill_graphs import MAX_TOKENS
from dynabatch.worker_svc.engine.runner import ModelRunner
from dynabatch.worker_svc.engine.sampler import RowSampling, Sampler
from dynabatch.worker_svc.engine.scheduler import PrefillChunk, Scheduler
from dynabatch.worker_svc.engine.sequence import Sequence


@dataclass(frozen=True)
class StepRecord:
    """What the last step ran and the wall time of its step() call (steps overlap, so back to
    back this is the step period)."""
    kind: Literal["prefill", "decode"]
    tokens: int            # tokens computed (the batch size in a decode step)
    context_tokens: int    # sum over the batch of tokens in cache after the step
    seconds: float


class PagedEngine:
    """Continuous batching with chunked prefill over a paged KV cache.

    Decode steps overlap: a step is scheduled, staged and launched while the previous one still
    runs on the GPU, and the previous step's tokens are read and handled while this one runs,
    so the host's work per step hides behind the device's. A sequence that stops on a token
    (EOS, a stop id) has therefore run one extra step, whose token is discarded.

    Emitted token ids include the stop token that ended a request (EOS or a stop id).
    """

    def __init__(self, model: PreTrainedModel, kv: KVCache, device: torch.device, *,
                 max_running: int, prefill_token_budget: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], cuda_graphs: bool, compile_decode: bool,
                 compile_prefill: bool, prefill_graphs: bool, seed: int,
                 gemv_rows: int = 0, mixed_steps: bool = False) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.max_model_len = min(max_model_len, kv.max_tokens)
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(kv, max_running, prefill_token_budget, mixed_steps)
        self.runner = ModelRunner(model, kv, device, max_running, self.max_model_len, cuda_graphs,
                                  compile_decode, compile_prefill,
                                  min(prefill_token_budget, MAX_TOKENS) if prefill_graphs else 0,
                                  gemv_rows)
        self.sampler = Sampler(device, seed)
        self._arrivals = itertools.count()
        self._pending: list[TokenOutput] = []
        self._decode_times: deque[tuple[float, int]] = deque(maxlen=STATS_WINDOW)
        self._prefill_times: deque[tuple[float, int]] = deque(maxlen=STATS_WINDOW)
        self._prefill_run = (0.0, 0)     # (seconds, prompt tokens) of steps not yet timed
        self._inflight: _Launched | None = None
        self._out = HostBuffers(1, max_running, pin=device.type == "cuda")   # sampled tokens
        self.steps = 0
        self.startup_s = 0.0  # set by build_engine
        self.startup_phases: dict[str, float] = {}   # set by build_engine
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
        seq.done = True
        inflight = self._inflight
        if inflight is not None and inflight.entries and all(s.done for s, _, _ in inflight.entries):
            self._inflight = None             # nothing left in flight to read
        return True

    def set_step_prefill_tokens(self, n: int) -> None:
        """Prefill tokens per step from now on (0: the configured maximum), at most that. Only
        with mixed steps: in alternating steps a smaller chunk only adds prefill steps, each of
        which stalls every decode, so that engine keeps its budget (and reports no cap)."""
        self.scheduler.set_step_cap(n)

    def has_work(self) -> bool:
        return bool(self._pending) or self._inflight is not None or self.scheduler.has_work()

    def step(self) -> list[TokenOutput]:
        """Runs one step; returns the tokens that became known (a decode step's tokens come out
        of the next step, which the GPU runs while the host reads them)."""
        outputs, self._pending = self._pending, []
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs + self._collect()
        if isinstance(batch[0], PrefillChunk):
            outputs += self._collect()          # prefill reads the tokens still in flight
            chunks = [c for c in batch if not c.seq.done]    # ...one of which may have stopped
            reads = any(c.wants_logits for c in chunks)
            outputs += self._prefill(chunks)
            n = sum(c.end - c.start for c in chunks)
            dt = time.perf_counter() - t0
            self._time_prefill(dt, sum(c.end - c.start for c in chunks if not c.decode), reads)
            self.last_step = StepRecord("prefill", n, sum(c.end for c in chunks), dt)
        else:
            seqs: list[Sequence] = batch  # type: ignore[assignment]
            self._prefill_run = (0.0, 0)        # this step's wait holds the run's GPU time
            logits, greedy = self.runner.decode(seqs)
            for s in seqs:
                s.num_computed += 1
            launched = self._launch(logits, seqs, decode=True, greedy=greedy)
            outputs += self._collect()          # the previous step's, while this one runs
            self._inflight = launched
            dt = time.perf_counter() - t0
            self._decode_times.append((dt, len(seqs)))
            self.last_step = StepRecord("decode", len(seqs), sum(s.num_computed for s in seqs), dt)
        self.steps += 1
        return outputs

    def _time_prefill(self, seconds: float, prompt_tokens: int, read_back: bool) -> None:
        """The prefill rate, from runs of back-to-back prefill steps that end in one reading its
        tokens back: a step that reads nothing does not wait for the GPU, so its own time is
        the host's alone; the run's sum holds the GPU's (each step waits for the one before)."""
        seconds += self._prefill_run[0]
        prompt_tokens += self._prefill_run[1]
        self._prefill_run = (0.0, 0) if read_back else (seconds, prompt_tokens)
        if read_back and prompt_tokens >= RATE_MIN_TOKENS:
            self._prefill_times.append((seconds, prompt_tokens))

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
            steps=self.steps, preemptions=self.scheduler.preemptions,
            step_prefill_tokens=self.scheduler.token_budget if self.scheduler.mixed else 0)

    # -- internals -------------------------------------------------------------------------
    def _prefill(self, chunks: list[PrefillChunk]) -> list[TokenOutput]:
        if not chunks:
            return []
        logits = self.runner.prefill(chunks)
        for c in chunks:
            c.seq.num_computed = c.end
        done = [c.seq for c in chunks if c.wants_logits]
        if not done:
            # Nothing to read back, but the step's inputs left pinned buffers that later steps
            # refill in turn (decode_inputs.py): the next step waits for this one, as for tokens.
            # Without the wait, back-to-back partial chunks (a long prompt under a small step
            # cap, nothing decoding) refilled a buffer before its copy ran (H100, session 15).
            self._inflight = self._marker()
            return []
        self._inflight = self._launch(logits, done, decode=False)
        return self._collect()

    def _marker(self) -> _Launched | None:
        """An in-flight step with no tokens: waiting for it waits for its copies."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return _Launched([], torch.empty(0, dtype=torch.int64), event)

    def _launch(self, logits: torch.Tensor, seqs: list[Sequence], decode: bool,
                greedy: torch.Tensor | None = None) -> _Launched:
        """Sample on the device and start the tokens' copy to the host, without waiting.

        Each sequence gets a placeholder token (decode_inputs.py reads it on the device); one
        whose output reaches its length limit with this token leaves the scheduler now, so no
        step runs it again (a stop token is only known when the token is). `greedy`: the tokens
        a decode graph already drew and kept (sampling then only redraws the random rows)."""
        random_rows = {i: RowSampling(s.req.sampling, s.num_output)
                       for i, s in enumerate(seqs) if s.req.sampling.temperature > 0}
        sampled = self.sampler(logits, random_rows, greedy)
        if decode and (greedy is None or random_rows):
            self.runner.inputs.keep_sampled(sampled)
        host = self._out.next(len(seqs))[0, : len(seqs)]
        host.copy_(sampled, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        entries = []
        for i, s in enumerate(seqs):
            index = len(s.tokens)
            s.tokens.append(-1 - i)
            ends = (index + 1 - s.num_prompt >= s.req.max_tokens
                    or index + 1 >= self.max_model_len)
            if ends:
                self.scheduler.drop(s)
            entries.append((s, index, ends))
        return _Launched(entries, host, event)

    def _collect(self) -> list[TokenOutput]:
        """Wait for the launched step's tokens; put them in place and finish what stopped."""
        launched, self._inflight = self._inflight, None
        if launched is None:
            return []
        outputs = []
        for (seq, index, ends), tok in zip(launched.entries, launched.tokens_on_host()):
            if seq.done:                      # aborted, or stopped a step before this one
                continue
            seq.tokens[index] = tok
            reason = "stop" if tok in seq.stop_ids else "length" if ends else None
            if reason is not None:
                seq.done = True
                if not ends:
                    self.scheduler.drop(seq)
            outputs.append(TokenOutput(seq.req.request_id, [tok], index - seq.num_prompt,
                                       reason))
        return outputs


@dataclass
class _Launched:
    """A step's sampled tokens on their way to the host (a pinned buffer; event when done)."""
    entries: list[tuple[Sequence, int, bool]]   # (sequence, its placeholder's index, ends)
    host: torch.Tensor
    event: torch.cuda.Event | None

    def tokens_on_host(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()          # the step's one host sync
        return self.host.tolist()
