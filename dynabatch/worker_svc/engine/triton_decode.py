"""Triton paged-decode attention: one query token per sequence, native grouped-query heads.

One program per (sequence, KV head) computes all query heads of that group at once, so each K/V
tile is read from HBM exactly once per step (no repeat_interleave). It walks only the sequence's
live context (online softmax over BLOCK_N-token tiles gathered through the block table), and the
context length is read on device, so the launch is CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, ctx_ptr, qk_scale,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_kb, stride_kh, stride_kt, stride_tb,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < ctx
        blk = tl.load(table_ptr + seq * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
        off = blk * stride_kb + kvh * stride_kh + (n % BS) * stride_kt
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale          # log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [N, KVH, BS, D] (D contiguous); returns [B, H, D]."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    batch, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q)
    block_n = max(64, block_size)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BS=block_size,
        BLOCK_N=block_n, num_warps=4, num_stages=2)
    return out
