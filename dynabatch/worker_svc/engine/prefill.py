"""Prefill forward for Llama-family layouts, without transformers' per-module host overhead.

A prefill step runs eagerly: its token count changes every step, so there is no CUDA graph to
replay. On a fast GPU it is then bound by the host, and transformers' layer modules (keyword
plumbing, decorators, one call per projection) cost ~0.75 ms of host time per layer on the H200
machine: 12 ms per prefill step for the 16-layer 1B shape, whatever the prompt length. That
fixed cost is most of the TTFT at moderate load and caps how many prompts a second one worker
can take in.

This forward runs the same math on the same parameters with torch ops called directly: fused
q/k/v and gate/up projections (fusion.py), rotary embedding applied to q and k in one pass,
`F.rms_norm`, and the paged prefill attention of attention.py (one flash-attention call per
layer on CUDA). Llama, Mistral, Qwen2 and Qwen3 (its
q/k norms) share this layout; other architectures keep the HF modules (runner.py). Greedy
output equals `model.generate` on CPU (tests/engine/test_engine.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.attention import PagedMetadata, prefill_attention, write_kv
from dynabatch.worker_svc.engine.fusion import FUSABLE_TYPES, LinearPart

Projection = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def supports_lean_prefill(model: PreTrainedModel) -> bool:
    base = model.base_model
    return (getattr(model.config, "model_type", None) in FUSABLE_TYPES
            and all(hasattr(base, n) for n in ("embed_tokens", "rotary_emb", "layers", "norm"))
            and getattr(model.config, "hidden_act", None) == "silu")


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm: in fp32, cast back, then scaled by the weight."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


def _projection(owner: nn.Module, names: tuple[str, ...]) -> Projection:
    """One GEMM when fusion.py fused the group, else one per projection."""
    first = getattr(owner, names[0])
    if isinstance(first, LinearPart):
        fused = first._fused
        return lambda x: F.linear(x, fused.weight, fused.bias).split(fused.splits, dim=-1)
    linears = [getattr(owner, n) for n in names]
    return lambda x: tuple(F.linear(x, lin.weight, lin.bias) for lin in linears)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated as transformers' apply_rotary_pos_emb (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Layer:
    def __init__(self, layer: nn.Module, config) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _projection(attn, ("q_proj", "k_proj", "v_proj"))
        self.gate_up = _projection(mlp, ("gate_proj", "up_proj"))
        self.o, self.down = attn.o_proj, mlp.down_proj
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale, self.index = attn.head_dim, attn.scaling, attn.layer_idx

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: PagedMetadata) -> torch.Tensor:
        t, d = h.shape[0], self.head_dim
        q, k, v = self.qkv(_rms(self.in_norm, h))
        if self.q_norm is None:        # q and k rotated together: one pass over both
            qk = _rope(torch.cat((q, k), dim=-1).view(t, -1, d), cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads:]
        else:
            q = _rope(_rms(self.q_norm, q.view(t, -1, d)), cos, sin)
            k = _rope(_rms(self.k_norm, k.view(t, -1, d)), cos, sin)
        v = v.view(t, -1, d)
        k_cache, v_cache = write_kv(meta.kv, self.index, k, v, meta.write_blocks,
                                    meta.write_offsets)
        o = prefill_attention(q, k_cache, v_cache, meta, self.scale, k, v)
        h = h + F.linear(o.reshape(t, -1), self.o.weight, self.o.bias)
        gate, up = self.gate_up(_rms(self.post_norm, h))
        return h + F.linear(F.silu(gate) * up, self.down.weight, self.down.bias)


class LeanPrefill:
    """ids/pos [T] -> logits [len(keep), V] over the paged cache (same contract as the HF
    forward in runner.py)."""

    def __init__(self, model: PreTrainedModel) -> None:
        base = model.base_model
        self.embed, self.rotary, self.norm = base.embed_tokens, base.rotary_emb, base.norm
        self.head = model.get_output_embeddings()
        self.layers = [_Layer(layer, model.config) for layer in base.layers]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, meta: PagedMetadata,
                 keep: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.embed.weight)
        cos, sin = self.rotary(h[None], pos[None])              # [1, T, D]
        cos, sin = cos[0, :, None], sin[0, :, None]
        for layer in self.layers:
            h = layer(h, cos, sin, meta)
        h = _rms(self.norm, h.index_select(0, keep))
        return F.linear(h, self.head.weight, self.head.bias)
