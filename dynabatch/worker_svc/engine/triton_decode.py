"""Triton paged-decode attention: one query token per sequence, native grouped-query heads.

One program per (sequence, KV head) computes all query heads of that group at once, so each K/V
tile is read from HBM exactly once per step (no repeat_interleave). The program also stores the
step's new K/V into its cache slot, and attends to that token from registers (the loop over
cached tiles covers the older ctx - 1 tokens), so no separate scatter kernel runs and no
store-then-load ordering is needed. It walks only the live context (online softmax over
BLOCK_N-token tiles gathered through the block table), and lengths are read on device, so the
launch is CUDA-graph safe.

Split-K ("flash-decoding"): at small batch the grid (batch x KV heads: 8 programs for a 1B
model at batch 1) leaves most of the GPU idle while each program walks the whole context
serially. Then each sequence's context is cut into SPLITS chunks handled by separate programs
(grid batch x KV heads x SPLITS), each writing a partial (max, sum, unnormalised output) per
query head to scratch, and a small second kernel merges the partials. SPLITS and the scratch
shapes depend only on the batch size and the table width (the longest context the table can
hold), so they are fixed when a CUDA graph is captured; the chunk length is derived on device
from each sequence's live length, so the work spreads evenly whatever the context, and splits
past the context write neutral partials (max -inf, sum 0). The split whose chunk holds position
ctx - 1 stores the new K/V and attends it from registers; no other split reads that slot.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_PROGRAMS_PER_SM = 2      # split until batch x KV heads x splits fills the SMs this many times
_MAX_SPLITS = 32
_SPLIT_BLOCK_N = 64       # tile (and chunk granularity) of the split kernel


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """Fold one tile of scores s [M, N] (log2 domain, -inf where masked) and its values v
    [N, D] into the running max m_i, sum l_i [M] and unnormalised output acc [M, D]. A row
    that has seen no unmasked score yet (a prefill piece past its query, triton_prefill.py)
    keeps max -inf, sum 0 and output 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - base[:, None])
    alpha = tl.exp2(m_i - base)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, wblk_ptr,
                         woff_ptr, table_ptr, ctx_ptr, rope_ptr, qk_scale, num_heads,
                         stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh,
                         stride_ot, stride_oh,
                         stride_kb, stride_kh, stride_kt, stride_tb, stride_rp,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                         ROPE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    # This split's positions: [lo, lo + chunk) clipped to the context; chunks are BLOCK_N-aligned.
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    owns_new = (lo < ctx) & (ctx <= lo + chunk)          # position ctx - 1 is in this chunk
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q_row = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_row + d[None, :], mask=gmask[:, None], other=0.0)
    # The new token: its owner stores it for later steps and uses it from registers now.
    k_row = kn_ptr + seq * stride_knt + kvh * stride_knh
    k_new = tl.load(k_row + d)
    v_new = tl.load(vn_ptr + seq * stride_vnt + kvh * stride_vnh + d)
    if ROPE:    # q and k arrive unrotated: rotate_half's pairs (d, d +- D/2) at position ctx-1
        cos_sin = rope_ptr + (ctx - 1) * stride_rp
        cos = tl.load(cos_sin + d).to(tl.float32)
        sin = tl.load(cos_sin + D + d).to(tl.float32)
        pair = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        q_pair = tl.load(q_row + pair[None, :], mask=gmask[:, None], other=0.0)
        q = (q.to(tl.float32) * cos[None, :]
             + sign[None, :] * q_pair.to(tl.float32) * sin[None, :]).to(q.dtype)
        k_new = (k_new.to(tl.float32) * cos
                 + sign * tl.load(k_row + pair).to(tl.float32) * sin).to(k_new.dtype)
    if owns_new:
        slot = (tl.load(wblk_ptr + seq) * stride_kb + kvh * stride_kh
                + tl.load(woff_ptr + seq) * stride_kt)
        tl.store(k_ptr + slot + d, k_new)
        tl.store(v_ptr + slot + d, v_new)
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # log2 domain
    m_i = tl.where(owns_new, s_new, float("-inf"))
    l_i = tl.where(owns_new, 1.0, 0.0) + tl.zeros([GROUP_PAD], tl.float32)
    acc = l_i[:, None] * v_new.to(tl.float32)[None, :]
    for start in range(lo, tl.minimum(lo + chunk, ctx - 1), BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < ctx - 1
        blk = tl.load(table_ptr + seq * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
        off = blk * stride_kb + kvh * stride_kh + (n % BS) * stride_kt
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    if SPLITS == 1:
        tl.store(o_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gmask[:, None])
    else:   # partials, [B, H, SPLITS] (max, sum) and [B, H, SPLITS, D] (output), fp32
        row = (seq * num_heads + heads) * SPLITS + split
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _merge_splits_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, num_heads, stride_ot, stride_oh,
                         SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """One program per (sequence, query head): rescale each split to the common max and sum."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    smask = s < SPLITS
    row = (seq * num_heads + head) * SPLITS + s
    m = tl.load(m_ptr + row, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))       # 0 for empty splits; the owner of ctx - 1 is finite
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + seq * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132       # the interpreter (CPU tests): as on an H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, max_context: int, sm_count: int) -> int:
    """Chunks per sequence: 1 when batch x KV heads already fills the GPU, else enough for
    about _PROGRAMS_PER_SM programs per SM, at most one per tile of the longest context."""
    programs = batch * kv_heads
    target = _PROGRAMS_PER_SM * sm_count
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), _MAX_SPLITS, -(-max_context // _SPLIT_BLOCK_N)))


@dataclass(frozen=True)
class Launch:
    """The decode kernel's tile length and Triton launch settings (tools/tune_decode.py sweeps
    them on a GPU)."""
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def default_launch(splits: int, dim: int, block_size: int) -> Launch:
    if splits > 1:
        return Launch(_SPLIT_BLOCK_N)
    return Launch(max(128 if dim <= 64 else 64, block_size))


def paged_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, write_blocks: torch.Tensor,
                 write_offsets: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, splits: int | None = None,
                 launch: Launch | None = None, rope: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D], k_new/v_new [B, KVH, D]; caches [N, KVH, BS, D] (D contiguous).

    Stores k_new/v_new at (write_blocks, write_offsets), position context_lens - 1 of each
    sequence, and returns attention over positions 0..context_lens - 1: [B, H, D]. `splits`
    (default: num_splits of the batch and the table width) > 1 runs the split-K path; `launch`
    (default: default_launch) sets the tile and launch settings. `rope` [positions, 2, D]
    (cos, then sin, per position: compiled.rope_table's): q and k_new arrive unrotated and
    are rotated here (transformers' rotate_half convention) at position context_lens - 1, so
    the rotary embedding needs no kernel of its own.
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
    if splits is None:
        splits = num_splits(batch, kv_heads, block_tables.shape[1] * block_size,
                            sm_count(q.device))
    launch = launch or default_launch(splits, dim, block_size)
    out = torch.empty_like(q)
    if splits == 1:
        acc = m = l = out            # m/l unused
    else:
        acc = torch.empty(batch, heads, splits, dim, device=q.device, dtype=torch.float32)
        m = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_new, v_new, k_cache, v_cache, acc, m, l, write_blocks, write_offsets, block_tables,
        context_lens, rope if rope is not None else q, scale * 1.4426950408889634, heads,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0),
        v_new.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        rope.stride(0) if rope is not None else 0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BS=block_size,
        BLOCK_N=launch.block_n, SPLITS=splits, ROPE=rope is not None, num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](
            acc, m, l, out, heads, out.stride(0), out.stride(1),
            SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), D=dim, num_warps=2)
    return out
