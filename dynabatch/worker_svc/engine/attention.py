"""Attention over the paged KV cache, registered with transformers' AttentionInterface.

The engine packs every scheduled token of a step into one row (batch 1, T tokens) and passes a
`PagedMetadata` through the model call as the `paged_metadata` keyword; transformers forwards
extra keywords down to the attention function. Each layer's function writes the step's new K/V
into the cache (slot by slot), then attends over each sequence's whole context:

* decode on CUDA: the Triton kernel in triton_decode.py (native GQA, reads only live blocks);
* otherwise (CPU, and prefill chunks): a pure-torch reference that gathers a sequence's blocks and
  calls SDPA with `enable_gqa` (no repeat_interleave of K/V).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "dynabatch_paged"


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


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            paged_metadata: PagedMetadata | None = None,
                            **_: object) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] -> ([1, T, H, D], None)."""
    meta = paged_metadata
    if meta is None:
        raise RuntimeError("dynabatch_paged attention needs paged_metadata (run through the engine)")
    k_cache, v_cache = meta.kv[module.layer_idx, 0], meta.kv[module.layer_idx, 1]
    # Advanced indices on dims 0 and 2 put the token dim first: [T, KVH, D].
    k_cache[meta.write_blocks, :, meta.write_offsets] = key[0].transpose(0, 1)
    v_cache[meta.write_blocks, :, meta.write_offsets] = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)  # [T, H, D]
    if meta.decode and q.is_cuda:
        from dynabatch.worker_svc.engine.triton_decode import paged_decode

        out = paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    else:
        out = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    return out.unsqueeze(0), None


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: PagedMetadata, scale: float) -> torch.Tensor:
    """Per sequence: gather its blocks, then causal SDPA with the queries at the context's end."""
    out = torch.empty_like(q)
    start = 0
    for q_len, ctx, blocks in zip(meta.query_lens, meta.context_lens_host, meta.seq_blocks):
        qs = q[start:start + q_len].transpose(0, 1)            # [H, L, D]
        k = gather_blocks(k_cache, blocks, ctx)                 # [KVH, ctx, D]
        v = gather_blocks(v_cache, blocks, ctx)
        out[start:start + q_len] = _sdpa_offset_causal(qs, k, v, scale).transpose(0, 1)
        start += q_len
    return out


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, ctx: int) -> torch.Tensor:
    """[KVH, ctx, D] view of one sequence's tokens from [N, KVH, BS, D] blocks."""
    g = cache[blocks]                                           # [nb, KVH, BS, D]
    return g.transpose(0, 1).reshape(g.shape[1], -1, g.shape[3])[:, :ctx]


def _sdpa_offset_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Query i sits at position ctx - L + i and sees keys 0..that position; native GQA."""
    q_len, ctx = q.shape[1], k.shape[1]
    if q_len == ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
    mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def register() -> str:
    """Register the function (idempotent); returns the attn_implementation name to load with."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
