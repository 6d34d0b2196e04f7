"""Triton paged prefill attention: packed chunks of queries over their paged contexts.

A prefill step packs chunks of several sequences ([T, H, D] queries); chunk i's queries are
the last q_len of its ctx tokens, whose K/V (the chunk's own included, written before this
kernel runs) sit in the paged cache behind the sequence's row of the device block table.

The work is cut into tiles of BLOCK_M queries of one chunk, listed on the host (`plan_tiles`);
one program per (tile, KV head) computes the tile's queries for all query heads of that group
at once (BLOCK_M x GROUP rows: native grouped-query attention, each K/V tile read once per
group), walking the context up to the tile's last query position with an online softmax and
the causal mask aligned at the context's end.

Every length is read on the device and the grid is fixed by the step's padded size (tiles past
the listed ones carry sequence -1 and return at once), so the launch is CUDA-graph safe: the
prefill graphs (prefill_graphs.py) replay it at bucketed token counts. Unlike flash attention's
variable-length form (attention.py), it reads a continued chunk's earlier context in place
through the block table instead of gathering it first.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from dynabatch.worker_svc.engine.triton_decode import online_softmax_step

BLOCK_M = 16        # queries per tile (x GROUP query heads: the rows of one program)
BLOCK_N = 64        # context tokens per inner step


@triton.jit
def _paged_prefill_kernel(q_ptr, o_ptr, k_ptr, v_ptr, tiles_ptr, seqs_ptr, table_ptr, qk_scale,
                          num_tiles, num_seqs,
                          stride_qt, stride_qh, stride_ot, stride_oh,
                          stride_kb, stride_kh, stride_kt, stride_tb,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)                   # tiles: [2, num_tiles] (chunk, first query)
    if seq < 0:
        return
    m0 = tl.load(tiles_ptr + num_tiles + tile)
    # seqs: [4, num_seqs] (query offset in the step, query count, context length, table row)
    q_start = tl.load(seqs_ptr + seq)
    q_len = tl.load(seqs_ptr + num_seqs + seq)
    ctx = tl.load(seqs_ptr + 2 * num_seqs + seq)
    row = tl.load(seqs_ptr + 3 * num_seqs + seq).to(tl.int64)
    r = tl.arange(0, BLOCK_M * GROUP_PAD)
    m = m0 + r // GROUP_PAD                           # the row's query within the chunk
    head = kvh * GROUP + r % GROUP_PAD
    rmask = (m < q_len) & (r % GROUP_PAD < GROUP)
    d = tl.arange(0, D)
    token = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)
    q_pos = ctx - q_len + m                           # each query's position in its sequence
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, D], tl.float32)
    hi = tl.minimum(ctx, ctx - q_len + m0 + BLOCK_M)  # past the tile's last query position
    for start in range(0, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        blk = tl.load(table_ptr + row * stride_tb + n // BS, mask=valid, other=0).to(tl.int64)
        off = blk * stride_kb + kvh * stride_kh + (n % BS) * stride_kt
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    out = acc / l_i[:, None]
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def max_tiles(tokens: int, seqs: int) -> int:
    """An upper bound on the tiles of `seqs` chunks of `tokens` tokens in all."""
    return tokens // BLOCK_M + seqs


def plan_tiles(q_lens: list[int], width: int) -> np.ndarray:
    """[2, width] int64: (chunk index, first query) of each BLOCK_M-query tile of the chunks,
    then (-1, 0) up to `width`."""
    tiles = np.zeros((2, width), dtype=np.int64)
    tiles[0] = -1
    i = 0
    for c, n in enumerate(q_lens):
        k = -(-n // BLOCK_M)
        tiles[0, i:i + k] = c
        tiles[1, i:i + k] = np.arange(0, n, BLOCK_M)
        i += k
    return tiles


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  tiles: torch.Tensor, seqs: torch.Tensor, table: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """q [T, H, D]; caches [N, KVH, BS, D] (D contiguous) holding every context token;
    tiles [2, NT] (plan_tiles); seqs [4, S] (query offset, query count, context length, row of
    `table` [R, W]) -> attention output [T, H, D] (rows no tile covers are left unset)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    heads, dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    num_tiles, num_seqs = tiles.shape[1], seqs.shape[1]
    group = heads // kv_heads
    _paged_prefill_kernel[(num_tiles, kv_heads)](
        q, out, k_cache, v_cache, tiles, seqs, table, scale * 1.4426950408889634,
        num_tiles, num_seqs, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), D=dim, BS=block_size,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2)
    return out
