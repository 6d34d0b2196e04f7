"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Random rows draw by the exponential race (argmax of p / E with E ~ Exp(1)), which equals sampling
from p and needs no multinomial. A seeded request draws its noise from a generator re-seeded with
(seed, output index), so its tokens depend only on its own seed and position: the same under any
batching, after a preemption, or when resumed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynabatch.worker_svc.engine.api import Sampling


@dataclass(frozen=True)
class RowSampling:
    sampling: Sampling
    output_index: int   # index of the token being drawn in the request's output


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(seed)
        self._row_gen = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, random_rows: dict[int, RowSampling],
                 greedy: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (on device); rows not in random_rows are greedy
        (`greedy`, when the caller already has them)."""
        if greedy is None:
            greedy = argmax_rows(logits)
        if not random_rows:
            return greedy
        order = sorted(random_rows)
        idx = _to_device(order, torch.int64, logits.device)
        probs = _filtered_probs(logits.index_select(0, idx).float(),
                                [random_rows[i].sampling for i in order])
        noise = torch.empty_like(probs)
        for j, i in enumerate(order):
            s = random_rows[i]
            if s.sampling.seed is None:
                noise[j].exponential_(generator=self._gen)
            else:
                self._row_gen.manual_seed(_mix(s.sampling.seed, s.output_index))
                noise[j].exponential_(generator=self._row_gen)
        drawn = argmax_rows(probs / noise)
        return greedy.index_copy(0, idx, drawn)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] int64, as x.argmax(-1) (ties and all -inf rows: the lowest index).

    torch reduces each row of an argmax inside one thread block: on a 128k vocabulary at batch 1
    that is one block on one SM (36 us of an H200 decode step). Two stages spread it: a max per
    chunk of each row ([B, C, V/C], many blocks), then an argmax over the C chunk maxima. Both
    stages take the first maximum, so the winner is the first chunk holding the row's maximum
    and its first position there: the lowest index, as torch.argmax. A vocabulary no chunk
    length divides is padded with -inf (after every real index, so it never wins a tie).
    On CUDA, the same two stages run as Triton kernels (triton_argmax.py): torch's chunked
    reduction ran at a fraction of bandwidth from batch 64 up (H200: 28.5 us at batch 64, 86 us
    at 256, against torch.argmax's 27 / 46 us; tools/micro_decode_ops.py).
    """
    batch, vocab = x.shape
    if x.is_cuda and vocab >= 8192 and _triton_argmax() is not None:
        return _triton_argmax()(x)
    chunk = _argmax_chunk(vocab)
    if chunk == 0:
        return x.argmax(dim=-1)
    if vocab % chunk:
        x = F.pad(x, (0, chunk - vocab % chunk), value=float("-inf"))
    vals, idx = x.reshape(batch, -1, chunk).max(dim=-1)            # [B, C]
    best = vals.argmax(dim=-1, keepdim=True)                       # [B, 1]
    return (best * chunk + idx.gather(1, best))[:, 0]


@functools.lru_cache(maxsize=None)
def _triton_argmax():
    """triton_argmax.argmax_rows (faster on CUDA at every batch), or None without Triton."""
    try:
        from dynabatch.worker_svc.engine.triton_argmax import argmax_rows as fast
    except ImportError:
        return None
    return fast


@functools.lru_cache(maxsize=None)
def _argmax_chunk(vocab: int) -> int:
    """Chunk length for argmax_rows: 0 (one stage) for small rows, else the smallest divisor
    of vocab in [256, 1024] (no padding copy), else 512."""
    if vocab < 8192:
        return 0
    return next((c for c in range(256, 1025) if vocab % c == 0), 512)


def _filtered_probs(logits: torch.Tensor, rows: list[Sampling]) -> torch.Tensor:
    """Softmax of logits / temperature with each row's top-k and top-p cut applied."""
    dev = logits.device
    temp = _to_device([r.temperature for r in rows], logits.dtype, dev)
    logits = logits / temp[:, None]
    if all(r.top_k <= 0 for r in rows) and all(r.top_p >= 1.0 for r in rows):
        return torch.softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    top_k = _to_device([r.top_k if 0 < r.top_k < vocab else vocab for r in rows], torch.int64, dev)
    top_p = _to_device([r.top_p for r in rows], logits.dtype, dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=dev)[None, :]
    cut = rank >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(cut, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below top_p (the first token always stays).
    before = probs.cumsum(dim=-1) - probs
    cut |= before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the stream (torch.tensor(...,
    device=cuda) synchronises it, which would stall the engine's overlapped steps)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _mix(seed: int, index: int) -> int:
    """A 63-bit generator seed from (request seed, output index) (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF
