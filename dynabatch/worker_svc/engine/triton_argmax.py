"""Greedy argmax over a large vocabulary in two Triton kernels, for CUDA decode steps.

torch's argmax reduces each row inside one thread block (one SM for a batch-1 step over a 128k
vocabulary), and the chunked torch version (sampler.argmax_rows) reads and writes the logits at
well under bandwidth at batch 64 and up. Here the first kernel takes (max, first index) of each
CHUNK-long piece of each row (grid rows x chunks: every SM busy at any batch); the second
picks, per row, the first chunk holding the row's maximum. Ties and all -inf rows therefore go
to the lowest index, as torch.argmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 4096


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, vocab, stride_row, chunks,
                      CHUNK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_row + offs, mask=offs < vocab, other=float("-inf"))
    best, at = tl.max(x.to(tl.float32), 0, return_indices=True,
                      return_indices_tie_break_left=True)
    tl.store(val_ptr + row * chunks + c, best)
    tl.store(idx_ptr + row * chunks + c, c * CHUNK + at)


@triton.jit
def _pick_chunk_kernel(val_ptr, idx_ptr, out_ptr, chunks, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_PAD)
    vals = tl.load(val_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
    _, first = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + first).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] (last dim contiguous) -> [B] int64, as x.argmax(-1) (NaN aside)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, vocab = x.shape
    chunks = triton.cdiv(vocab, _CHUNK)
    vals = torch.empty(batch, chunks, device=x.device, dtype=torch.float32)
    idx = torch.empty(batch, chunks, device=x.device, dtype=torch.int32)
    out = torch.empty(batch, device=x.device, dtype=torch.int64)
    _chunk_max_kernel[(batch, chunks)](x, vals, idx, vocab, x.stride(0), chunks, CHUNK=_CHUNK,
                                       num_warps=4)
    _pick_chunk_kernel[(batch,)](vals, idx, out, chunks,
                                 CHUNKS_PAD=triton.next_power_of_2(chunks), num_warps=1)
    return out
