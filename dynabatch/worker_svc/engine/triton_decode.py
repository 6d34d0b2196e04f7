"""Triton paged-decode attention: one query token per sequence, native grouped-query heads.

One program per (sequence, KV head) computes all query heads of that group at once, so each K/V
tile is read from HBM exactly once per step (no repeat_interleave). The program also stores the
step's new K/V into its cache slot, and attends to that token from registers (the loop over
cached tiles covers the older ctx - 1 tokens), so no separate scatter kernel runs and no
store-then-load ordering is needed. It walks only the live context (online softmax over
BLOCK_N-token tiles gathered through the block table), and lengths are read on device, so the
launch is CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, o_ptr, wblk_ptr, woff_ptr,
                         table_ptr, ctx_ptr, qk_scale,
                         stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh,
                         stride_ot, stride_oh,
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
    # The new token: store it for later steps, use it from registers now.
    k_new = tl.load(kn_ptr + seq * stride_knt + kvh * stride_knh + d)
    v_new = tl.load(vn_ptr + seq * stride_vnt + kvh * stride_vnh + d)
    slot = (tl.load(wblk_ptr + seq) * stride_kb + kvh * stride_kh
            + tl.load(woff_ptr + seq) * stride_kt)
    tl.store(k_ptr + slot + d, k_new)
    tl.store(v_ptr + slot + d, v_new)
    m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # log2 domain
    l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32) + v_new.to(tl.float32)[None, :]
    for start in range(0, ctx - 1, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < ctx - 1
        blk = tl.load(table_ptr + seq * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
        off = blk * stride_kb + kvh * stride_kh + (n % BS) * stride_kt
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
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


def paged_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, write_blocks: torch.Tensor,
                 write_offsets: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], k_new/v_new [B, KVH, D]; caches [N, KVH, BS, D] (D contiguous).

    Stores k_new/v_new at (write_blocks, write_offsets), position context_lens - 1 of each
    sequence, and returns attention over positions 0..context_lens - 1: [B, H, D].
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_new.stride(-1) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(-1) != 1:
        v_new = v_new.contiguous()
    batch, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q)
    block_n = max(128 if dim <= 64 else 64, block_size)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_new, v_new, k_cache, v_cache, out, write_blocks, write_offsets, block_tables,
        context_lens, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0),
        v_new.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BS=block_size,
        BLOCK_N=block_n, num_warps=4, num_stages=2)
    return out
