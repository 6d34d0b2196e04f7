"""Triton paged prefill attention: packed chunks of queries over their paged contexts.

A prefill step packs chunks of several sequences ([T, H, D] queries); chunk i's queries are
the last q_len of its ctx tokens, whose K/V (the chunk's own included, written before this
kernel runs) sit in the paged cache behind the sequence's row of the device block table.

The work is cut into tiles of BLOCK_M queries of one chunk; one program per (work item, KV
head) computes a tile's queries for all query heads of that group at once (BLOCK_M x GROUP
rows: native grouped-query attention, each K/V tile read once per group), walking context
positions [lo, hi) with an online softmax and the causal mask aligned at the context's end.

Split context ("flash-decoding" for prefill tiles): a mixed step (decode rows riding along a
chunk, scheduler.py) has few tiles, some of one query, on long contexts. One program per tile
and KV head then leaves most SMs idle while each walks its whole context alone: 4-6 sequences
at 4k tokens made a mixed step of the 8B shape take 9-12 ms against a 5.5-ms decode step
(H100, session 15). So when a step has fewer tiles than fill the GPU, the host (`plan`) cuts
the longer tiles' contexts into pieces of about equal length, each a work item writing a
partial (max, sum, unnormalised output) to a scratch slot; a second kernel merges each split
tile's pieces. Tiles left whole store their output directly.

Every length is read on the device and both grids are fixed by the step's padded size (items
and merges past the listed ones carry sequence -1 and return at once), so the launches are
CUDA-graph safe: the prefill graphs (prefill_graphs.py) replay them at bucketed token counts.
Unlike flash attention's variable-length form (attention.py), the kernel reads a continued
chunk's earlier context in place through the block table instead of gathering it first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from dynabatch.worker_svc.engine.triton_decode import online_softmax_step

BLOCK_M = 16        # queries per tile (x GROUP query heads: the rows of one program)
BLOCK_N = 64        # context tokens per inner step
MIN_PIECE = 256     # context tokens: a shorter tile is not split (its merge would cost more)
PROGRAMS_PER_SM = 2 # split until work items x KV heads fill the SMs this many times


@triton.jit
def _tile_rows(seqs_ptr, num_seqs, seq, m0, kvh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """A tile's rows (query x head of the KV head's group): (row ids, query within the chunk,
    head, mask of real rows, token in the step, the chunk's query count)."""
    q_start = tl.load(seqs_ptr + seq)     # seqs: [4, S] (query offset, count, context, row)
    q_len = tl.load(seqs_ptr + num_seqs + seq)
    r = tl.arange(0, BLOCK_M * GROUP_PAD)
    m = m0 + r // GROUP_PAD
    head = kvh * GROUP + r % GROUP_PAD
    rmask = (m < q_len) & (r % GROUP_PAD < GROUP)
    return r, m, head, rmask, (q_start + m).to(tl.int64), q_len


@triton.jit
def _paged_prefill_kernel(q_ptr, o_ptr, k_ptr, v_ptr, items_ptr, seqs_ptr, table_ptr,
                          acc_ptr, m_ptr, l_ptr, qk_scale, num_items, num_seqs, kv_heads,
                          stride_qt, stride_qh, stride_ot, stride_oh,
                          stride_kb, stride_kh, stride_kt, stride_tb,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(items_ptr + item)       # items: [5, NI] (chunk, first query, lo, hi, slot)
    if seq < 0:
        return
    m0 = tl.load(items_ptr + num_items + item)
    lo = tl.load(items_ptr + 2 * num_items + item)
    hi = tl.load(items_ptr + 3 * num_items + item)
    slot = tl.load(items_ptr + 4 * num_items + item)
    r, m, head, rmask, token, q_len = _tile_rows(seqs_ptr, num_seqs, seq, m0, kvh, GROUP,
                                                 GROUP_PAD, BLOCK_M)
    ctx = tl.load(seqs_ptr + 2 * num_seqs + seq)
    row = tl.load(seqs_ptr + 3 * num_seqs + seq).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)
    q_pos = ctx - q_len + m                           # each query's position in its sequence
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        blk = tl.load(table_ptr + row * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
        off = blk * stride_kb + kvh * stride_kh + (n % BS) * stride_kt
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    if slot < 0:
        tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=rmask[:, None])
    else:       # a piece: its partial, [slots, KVH, rows] (max, sum) and [..., D] (output)
        srow = ((slot * kv_heads + kvh) * (BLOCK_M * GROUP_PAD) + r).to(tl.int64)
        tl.store(m_ptr + srow, m_i)
        tl.store(l_ptr + srow, l_i)
        tl.store(acc_ptr + srow[:, None] * D + d[None, :], acc)


@triton.jit
def _merge_pieces_kernel(o_ptr, merges_ptr, seqs_ptr, acc_ptr, m_ptr, l_ptr, num_merges,
                         num_seqs, kv_heads, stride_ot, stride_oh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """One program per (split tile, KV head): rescale its pieces to a common max and sum."""
    j = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(merges_ptr + j)         # merges: [4, NM] (chunk, first query, slot, pieces)
    if seq < 0:
        return
    m0 = tl.load(merges_ptr + num_merges + j)
    first = tl.load(merges_ptr + 2 * num_merges + j)
    count = tl.load(merges_ptr + 3 * num_merges + j)
    r, m, head, rmask, token, q_len = _tile_rows(seqs_ptr, num_seqs, seq, m0, kvh, GROUP,
                                                 GROUP_PAD, BLOCK_M)
    d = tl.arange(0, D)
    m_all = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, D], tl.float32)
    for p in range(first, first + count):
        srow = ((p * kv_heads + kvh) * (BLOCK_M * GROUP_PAD) + r).to(tl.int64)
        m_p = tl.load(m_ptr + srow)
        m_new = tl.maximum(m_all, m_p)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row no piece has seen yet
        a_old = tl.exp2(m_all - base)
        a_p = tl.exp2(m_p - base)
        l_all = l_all * a_old + tl.load(l_ptr + srow) * a_p
        part = tl.load(acc_ptr + srow[:, None] * D + d[None, :])
        acc = acc * a_old[:, None] + part * a_p[:, None]
        m_all = m_new
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             (acc / l_all[:, None]).to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def max_tiles(tokens: int, seqs: int) -> int:
    """An upper bound on the tiles of `seqs` chunks of `tokens` tokens in all."""
    return tokens // BLOCK_M + seqs


def split_target(kv_heads: int, sm_count: int) -> int:
    """Work items that fill the GPU PROGRAMS_PER_SM times over (each runs on every KV head)."""
    return -(-PROGRAMS_PER_SM * sm_count // kv_heads)


def plan(q_lens: list[int], ctx_lens: list[int], width: int, slots: int, target: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """The work of chunks of q_lens queries ending contexts of ctx_lens tokens: items [5, width]
    (chunk, first query, lo, hi, scratch slot or -1) and merges [4, slots // 2] (chunk, first
    query, first slot, pieces), padded with chunk -1. With fewer tiles than `target`, tiles
    longer than a piece (their context / target, at least MIN_PIECE) are cut into pieces while
    `slots` last. `width` must be at least max_tiles + slots."""
    q = np.asarray(q_lens, dtype=np.int64)
    ctx = np.asarray(ctx_lens, dtype=np.int64)
    per_chunk = -(-q // BLOCK_M)
    chunk = np.repeat(np.arange(len(q)), per_chunk)
    m0 = (np.arange(len(chunk)) - np.repeat(np.cumsum(per_chunk) - per_chunk, per_chunk)) * BLOCK_M
    hi = np.minimum(ctx[chunk], ctx[chunk] - q[chunk] + m0 + BLOCK_M)   # past the last query
    pieces = np.ones_like(hi)
    span = hi
    if slots and len(hi) < target:
        piece = max(MIN_PIECE, -(-int(hi.sum()) // target // BLOCK_N) * BLOCK_N)
        pieces = -(-hi // piece)
        split = pieces > 1
        split &= (np.cumsum(np.where(split, pieces, 0)) <= slots) & (np.cumsum(split) <= slots // 2)
        pieces = np.where(split, pieces, 1)
        span = np.where(split, piece, hi)
    tile = np.repeat(np.arange(len(hi)), pieces)
    p = np.arange(len(tile)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    lo = p * span[tile]
    split = pieces > 1
    first_slot = np.cumsum(np.where(split, pieces, 0)) - np.where(split, pieces, 0)
    items = np.zeros((5, width), dtype=np.int64)
    items[0] = -1
    n = len(tile)
    items[:, :n] = (chunk[tile], m0[tile], lo, np.minimum(hi[tile], lo + span[tile]),
                    np.where(split[tile], first_slot[tile] + p, -1))
    merges = np.zeros((4, slots // 2), dtype=np.int64)
    merges[0] = -1
    k = int(split.sum())
    merges[:, :k] = chunk[split], m0[split], first_slot[split], pieces[split]
    return items, merges


@dataclass(frozen=True)
class Scratch:
    """The pieces' partials: acc [slots, KVH, rows, D], max and sum [slots, KVH, rows], fp32."""
    acc: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor

    @staticmethod
    def make(slots: int, heads: int, kv_heads: int, dim: int, device: torch.device) -> Scratch:
        rows = BLOCK_M * triton.next_power_of_2(heads // kv_heads)
        acc = torch.empty(max(slots, 1), kv_heads, rows, dim, device=device, dtype=torch.float32)
        m = torch.empty(acc.shape[:3], device=device, dtype=torch.float32)
        return Scratch(acc, m, torch.empty_like(m))


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  items: torch.Tensor, merges: torch.Tensor, seqs: torch.Tensor,
                  table: torch.Tensor, scale: float, scratch: Scratch | None = None
                  ) -> torch.Tensor:
    """q [T, H, D]; caches [N, KVH, BS, D] (D contiguous) holding every context token;
    items [5, NI] and merges [4, NM] (plan; pieces need `scratch` of as many slots); seqs
    [4, S] (query offset, query count, context length, row of `table` [R, W]) -> attention
    output [T, H, D] (rows no tile covers are left unset)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    heads, dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    num_items, num_merges, num_seqs = items.shape[1], merges.shape[1], seqs.shape[1]
    group = heads // kv_heads
    consts = dict(GROUP=group, GROUP_PAD=triton.next_power_of_2(group), D=dim,
                  BLOCK_M=BLOCK_M)
    parts = (scratch.acc, scratch.m, scratch.l) if scratch is not None else (out, out, out)
    _paged_prefill_kernel[(num_items, kv_heads)](
        q, out, k_cache, v_cache, items, seqs, table, *parts, scale * 1.4426950408889634,
        num_items, num_seqs, kv_heads, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
        BS=block_size, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2, **consts)
    if num_merges and scratch is not None:
        _merge_pieces_kernel[(num_merges, kv_heads)](
            out, merges, seqs, *parts, num_merges, num_seqs, kv_heads, out.stride(0),
            out.stride(1), num_warps=4, **consts)
    return out
