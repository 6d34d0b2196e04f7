"""Decode steps of a few rows (1..4) in 6 kernels per layer: the Triton GEMV with its neighbours
fused in, and the paged-decode kernel rotating q and k itself.

At batch 1 a decode step is a weight read: 2.5 GB for the 1B shape, 0.58 ms at an H200's 4.25
TB/s. What the compiled HF layers add on top are kernels: per layer the input norm, q/k/v, the
rotary embedding, attention (and its split merge), o, the residual add with the second norm,
gate/up, the activation, down and the last residual add, ~11 launches of which five only move a
few KB. In a CUDA graph each still costs its launch and ramp (a few us), ~0.4 ms a step over 16
layers. Here each weight read carries its neighbours instead (triton_gemv.gemv's fusions):

    qkv = gemv(h, Wqkv, norm=input_norm)             # RMSNorm in the prologue
    o   = paged_decode(q, k, v, rope=cos/sin table)  # rotary + cache write + attention (+ merge)
    h   = gemv(o, Wo, residual=h)                    # residual add in the epilogue
    gu  = gemv(h, Wgu, norm=post_attention_norm)
    h   = gemv(gu, Wdown, silu_mul=True, residual=h) # silu(gate) * up in the prologue
    logits = gemv(h, lm_head, norm=final_norm)

Nothing here is compiled (no torch.compile variants at start-up for these batch sizes) and
every kernel is graph safe, so graphs.py captures it per bucket like the compiled forward.
Llama, Mistral and Qwen2 (no q/k norms, SiLU MLP, a static rotary table); runner.py keeps the
compiled HF layers for larger steps and for other layouts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.attention import PagedMetadata
from dynabatch.worker_svc.engine.prefill import (_DOWN, _DOWN_B, _GU, _GU_B, _IN, _KN, _O, _O_B,
                                                 _POST, _QKV, _QKV_B, _QN, _weights,
                                                 supports_lean_prefill)

MAX_ROWS = 4        # the GEMV's fused forms take at most this many rows (its fma path)


def supports_lean_decode(model: PreTrainedModel, rope: torch.Tensor | None) -> bool:
    """The lean prefill's layout, without q/k norms (Qwen3), with a static rotary table."""
    return (rope is not None and supports_lean_prefill(model)
            and all(w[_QN] is None and w[_KN] is None
                    for w in map(_weights, model.base_model.layers)))


class LeanDecode:
    """ids/pos [B] -> logits [B, V], B <= MAX_ROWS (the decode forward's contract)."""

    def __init__(self, model: PreTrainedModel, rope: torch.Tensor) -> None:
        from dynabatch.worker_svc.engine import triton_decode, triton_gemv   # need triton

        self._gemv, self._attend = triton_gemv.gemv, triton_decode.paged_decode
        base, config = model.base_model, model.config
        attn = base.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.eps = base.layers[0].input_layernorm.variance_epsilon
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        head = model.get_output_embeddings()
        self.head_weight, self.head_bias = head.weight, head.bias
        self.weights = [_weights(layer) for layer in base.layers]
        self.rope = rope

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, meta: PagedMetadata,
                 keep: None = None) -> torch.Tensor:
        b, d = ids.shape[0], self.head_dim
        if b > MAX_ROWS:
            raise ValueError(f"lean decode takes at most {MAX_ROWS} rows, got {b}")
        q_end, k_end = self.heads * d, (self.heads + self.kv_heads) * d
        gemv, eps = self._gemv, self.eps
        h = F.embedding(ids, self.embed)
        for i, w in enumerate(self.weights):
            qkv = gemv(h, w[_QKV], w[_QKV_B], norm=w[_IN], eps=eps)
            o = self._attend(qkv[:, :q_end].view(b, self.heads, d),
                             qkv[:, q_end:k_end].view(b, self.kv_heads, d),
                             qkv[:, k_end:].view(b, self.kv_heads, d),
                             meta.kv[i, 0], meta.kv[i, 1], meta.write_blocks, meta.write_offsets,
                             meta.block_tables, meta.context_lens, self.scale, rope=self.rope)
            h = gemv(o.view(b, q_end), w[_O], w[_O_B], residual=h)
            gu = gemv(h, w[_GU], w[_GU_B], norm=w[_POST], eps=eps)
            h = gemv(gu, w[_DOWN], w[_DOWN_B], silu_mul=True, residual=h)
        return gemv(h, self.head_weight, self.head_bias, norm=self.norm, eps=eps)
