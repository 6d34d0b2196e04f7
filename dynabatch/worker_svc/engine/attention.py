"""Attention over the paged KV cache, registered with transformers' AttentionInterface.

The engine packs every scheduled token of a step into one row (batch 1, T tokens) and passes a
`PagedMetadata` through the model call as the `paged_metadata` keyword; transformers forwards
extra keywords down to the attention function. Each layer's function writes the step's new K/V
into the cache (slot by slot), then attends over each sequence's whole context:

* decode on CUDA: the Triton kernel in triton_decode.py (native GQA, reads only live blocks);
* prefill steps replayed from CUDA graphs (prefill_graphs.py): the Triton kernel in
  triton_prefill.py, which reads each context in place through the device block table;
* other prefill on CUDA in 16-bit: one variable-length flash-attention call for the whole step
  (`VarlenPlan`: the chunks' queries packed, each attending to its whole context, causal
  aligned at the context's end), instead of one SDPA call per sequence;
* otherwise (CPU, fp32): a pure-torch reference that gathers a sequence's blocks and calls SDPA
  with `enable_gqa` (no repeat_interleave of K/V).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

if TYPE_CHECKING:       # triton_prefill imports triton: only where the kernel runs
    from dynabatch.worker_svc.engine.triton_prefill import Scratch

ATTN_IMPLEMENTATION = "dynabatch_paged"


@dataclass
class VarlenPlan:
    """A prefill step's layout for flash attention's variable-length form (same every layer)."""
    cu_q: torch.Tensor                    # [B+1] int32, query offsets in the packed step
    cu_k: torch.Tensor                    # [B+1] int32, context offsets in the packed contexts
    max_q: int
    max_k: int
    # Each context token's rows in a layer's flat K/V (kv_rows), packed; None when every chunk
    # is a whole fresh prompt (the step's own K/V then are the contexts).
    ctx_rows: torch.Tensor | None


@dataclass
class PagedPlan:
    """A prefill step's layout for the Triton paged kernel (triton_prefill.py), which reads
    every context in place through the device block table; CUDA-graph safe."""
    items: torch.Tensor                   # [5, NI]: triton_prefill.plan's work items
    merges: torch.Tensor                  # [4, NM]: its split tiles
    seqs: torch.Tensor                    # [4, S]: query offset, query count, context, row
    table: torch.Tensor                   # [R, W] int32, the device block table
    scratch: Scratch | None = None        # the pieces' partials


def varlen_plan(starts: list[int], ends: list[int], tables: list[np.ndarray], kv: torch.Tensor
                ) -> VarlenPlan:
    """The plan of chunks [start, end) of sequences with these block tables; each context's
    slots are listed unless every chunk is a whole fresh prompt."""
    def on_device(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(kv.device, dtype, non_blocking=True)

    q_lens = [e - s for s, e in zip(starts, ends)]
    cu_q = np.concatenate(([0], np.cumsum(q_lens)))
    if not any(starts):
        return VarlenPlan(on_device(cu_q, torch.int32), on_device(cu_q, torch.int32),
                          max(q_lens), max(ends), None)
    block_size = kv.shape[4]
    cu_k = np.concatenate(([0], np.cumsum(ends)))
    every = np.concatenate([np.arange(n) for n in ends])
    blocks = np.concatenate([t[np.arange(n) // block_size] for t, n in zip(tables, ends)])
    return VarlenPlan(on_device(cu_q, torch.int32), on_device(cu_k, torch.int32), max(q_lens),
                      max(ends), kv_rows(kv, on_device(blocks), on_device(every % block_size)))


def kv_rows(kv: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[2, T, KVH]: where the K (then V) of each token's slot (block, offset) and each K/V head
    lies in a layer's cache seen as rows of head_dim (`kv[layer].view(-1, head_dim)`), so that
    a whole step's K/V is written (or read) with one index_copy_ (index_select) per layer."""
    _, _, num_blocks, kv_heads, block_size, _ = kv.shape
    heads = torch.arange(kv_heads, device=blocks.device)
    rows = (blocks[:, None] * kv_heads + heads) * block_size + offsets[:, None]
    return torch.stack((rows, rows + num_blocks * kv_heads * block_size))


def write_rows(kv: torch.Tensor, layer: int, kv_new: torch.Tensor, rows: torch.Tensor) -> None:
    """Store a step's new K/V ([2, T, KVH, D]) at its kv_rows."""
    d = kv.shape[-1]
    kv[layer].view(-1, d).index_copy_(0, rows.flatten(), kv_new.reshape(-1, d))


@dataclass
class PagedMetadata:
    """Where the step's tokens go and what each sequence attends to.

    Device tensors are indexed per token (write_blocks/write_offsets, length T) or per sequence
    (block_tables/context_lens, length B). In a decode step T == B and every query_len is 1.
    """
    kv: torch.Tensor                      # [layers, 2, blocks, kv_heads, block_size, head_dim]
    write_blocks: torch.Tensor            # [T] physical block of each new token
    write_offsets: torch.Tensor           # [T] offset inside that block
    block_tables: torch.Tensor            # [B, W] int32
    context_lens: torch.Tensor            # [B] int32, tokens in cache after this step
    decode: bool
    # Host copies the reference path needs (prefill): per sequence, its query length, context
    # length and block ids as a device tensor.
    query_lens: list[int] = field(default_factory=list)
    context_lens_host: list[int] = field(default_factory=list)
    seq_blocks: list[torch.Tensor] = field(default_factory=list)
    varlen: VarlenPlan | None = None
    paged: PagedPlan | None = None
    write_rows: torch.Tensor | None = None    # prefill: kv_rows of the new tokens' slots


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            paged_metadata: PagedMetadata | None = None,
                            paged_layer: torch.Tensor | None = None,
                            **_: object) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] -> ([1, T, H, D], None).

    `paged_layer` (compiled decode, compiled.py): the layer's index as a CPU scalar tensor, so
    that one compiled graph serves every layer without making the modules' other ints symbolic.
    """
    meta = paged_metadata
    if meta is None:
        raise RuntimeError("dynabatch_paged attention needs paged_metadata (run it through "
                           "the engine)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    if meta.decode:
        layer = layer_index(module.layer_idx) if paged_layer is None else paged_layer
        out = torch.ops.dynabatch.paged_decode(q, k, v, meta.kv, layer,
                                               meta.write_blocks, meta.write_offsets,
                                               meta.block_tables, meta.context_lens, scale)
    else:
        write_rows(meta.kv, module.layer_idx, torch.stack((k, v)), meta.write_rows)
        out = prefill_attention(q, meta.kv, module.layer_idx, meta, scale, k, v)
    return out.unsqueeze(0), None


def prefill_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, meta: PagedMetadata,
                      scale: float, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """A prefill step's attention (its K/V already written in `kv`'s `layer`):
    q [T, H, D] -> [T, H, D]."""
    if meta.paged is not None:
        from dynabatch.worker_svc.engine.triton_prefill import paged_prefill

        p = meta.paged
        return paged_prefill(q, kv[layer, 0], kv[layer, 1], p.items, p.merges, p.seqs, p.table,
                             scale, p.scratch)
    plan = meta.varlen
    if plan is None:
        return reference_paged_attention(q, kv[layer, 0], kv[layer, 1], meta, scale, k_new,
                                         v_new)
    if plan.ctx_rows is None:
        k, v = k_new, v_new
    else:
        d = kv.shape[-1]
        ctx = kv[layer].view(-1, d).index_select(0, plan.ctx_rows.flatten())
        k, v = ctx.view(2, -1, kv.shape[3], d).unbind(0)        # [Tk, KVH, D] each
    # Flash attention takes fewer K/V heads than query heads as they are (native GQA), and
    # aligns the causal mask at the end of each context when it is longer than the queries.
    return torch.ops.aten._flash_attention_forward(
        q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, 0.0, True, False,
        scale=scale)[0]


def write_kv(kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store new K/V ([T, KVH, D]) at their slots; returns the layer's (K, V) caches."""
    k_cache, v_cache = kv[layer, 0], kv[layer, 1]
    # Advanced indices on dims 0 and 2 put the token dim first: [T, KVH, D].
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v
    return k_cache, v_cache


@functools.lru_cache(maxsize=None)
def layer_index(layer: int) -> torch.Tensor:
    """A layer's index as the CPU scalar tensor paged_decode takes (made once per index)."""
    return torch.tensor(layer)


@torch.library.custom_op("dynabatch::paged_decode", mutates_args=("kv",))
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                 layer_t: torch.Tensor,
                 write_blocks: torch.Tensor, write_offsets: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """One decode token per sequence: write its K/V, attend over its context. q [B, H, D].

    A custom op so torch.compile treats it as one opaque node: on CUDA the Triton kernel, which
    also does the cache write. `layer_t`: the layer's index, a CPU scalar tensor (read without
    a device sync; a tensor, so compiled graphs are not specialised on it).
    """
    layer = int(layer_t)
    if q.is_cuda:
        from dynabatch.worker_svc.engine.triton_decode import paged_decode as triton_decode

        return triton_decode(q, k, v, kv[layer, 0], kv[layer, 1], write_blocks, write_offsets,
                             block_tables, context_lens, scale)
    k_cache, v_cache = write_kv(kv, layer, k, v, write_blocks, write_offsets)
    bs = k_cache.shape[2]
    ctx = context_lens.tolist()
    meta = PagedMetadata(kv=kv, write_blocks=write_blocks, write_offsets=write_offsets,
                         block_tables=block_tables, context_lens=context_lens, decode=True,
                         query_lens=[1] * len(ctx), context_lens_host=ctx,
                         seq_blocks=[block_tables[i, : -(-c // bs)] for i, c in enumerate(ctx)])
    return reference_paged_attention(q, k_cache, v_cache, meta, scale)


@paged_decode.register_fake
def _(q, k, v, kv, layer_t, write_blocks, write_offsets, block_tables, context_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: PagedMetadata, scale: float, k_new: torch.Tensor | None = None,
                              v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence: gather its blocks, then causal SDPA with the queries at the context's end.

    With the step's own K/V given (k_new/v_new, [T, KVH, D]), runs of consecutive fresh
    sequences (whole context in this chunk) of equal length skip the gather and share one
    batched causal SDPA call.
    """
    out = torch.empty_like(q)
    lens, ctxs = meta.query_lens, meta.context_lens_host
    start, i = 0, 0
    while i < len(lens):
        q_len, ctx = lens[i], ctxs[i]
        if k_new is not None and v_new is not None and q_len == ctx:
            j = i
            while j < len(lens) and lens[j] == q_len and ctxs[j] == q_len:
                j += 1
            n, end = j - i, start + (j - i) * q_len
            qs, ks, vs = (t[start:end].unflatten(0, (n, q_len)).transpose(1, 2)
                          for t in (q, k_new, v_new))            # [n, heads, L, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=True)
            out[start:end] = o.transpose(1, 2).flatten(0, 1)
            start, i = end, j
            continue
        qs = q[start:start + q_len].transpose(0, 1)            # [H, L, D]
        k = gather_blocks(k_cache, meta.seq_blocks[i], ctx)     # [KVH, ctx, D]
        v = gather_blocks(v_cache, meta.seq_blocks[i], ctx)
        out[start:start + q_len] = _sdpa_offset_causal(qs, k, v, scale).transpose(0, 1)
        start, i = start + q_len, i + 1
    return out


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, ctx: int) -> torch.Tensor:
    """[KVH, ctx, D] view of one sequence's tokens from [N, KVH, BS, D] blocks."""
    g = cache[blocks]                                           # [nb, KVH, BS, D]
    return g.transpose(0, 1).reshape(g.shape[1], -1, g.shape[3])[:, :ctx]


def _sdpa_offset_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Query i sits at position ctx - L + i and sees keys 0..that position; native GQA."""
    q_len, ctx = q.shape[1], k.shape[1]
    q, k, v = q[None], k[None], v[None]      # 4-D: SDPA's CPU kernels are faster batched
    if q_len == ctx:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    elif q_len == 1:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    return out[0]


def register() -> str:
    """Register the function (idempotent); returns the attn_implementation name to load with."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
