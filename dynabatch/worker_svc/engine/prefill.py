"""Prefill forward for Llama-family layouts, without transformers' per-module host overhead.

A prefill step's token count changes every step, so there is no CUDA graph to replay: on a fast
GPU the step is bound by the host's launches. transformers' layer modules (keyword plumbing,
decorators, one call per projection) cost ~0.75 ms of host time per layer on the H200 machine;
the same math called op by op (fused q/k/v and gate/up projections, fusion.py; q and k rotated
in one pass; `F.rms_norm`) still launched ~25 kernels per layer, 7-7.7 ms per step for the
16-layer 1B shape whatever the prompt length (session 5) — most of a TTFT at moderate load, and
a stall of every running sequence each time a prompt arrives.

So the layer is cut at attention into pieces that torch.compile turns into a few kernels each
("piecewise" compilation, as vLLM's): everything between one layer's attention and the next
(o projection, residual adds, both norms, the MLP, the next q/k/v projection and rotary
embedding) is one compiled function shared by all layers, with the token count dynamic. Only
the cache write (one `index_copy_` per layer) and the flash-attention call run between the
pieces. Without `compiled` the same functions run eagerly (CPU tests, and the A/B benchmark).

Llama, Mistral, Qwen2 and Qwen3 (its q/k norms) share this layout; other architectures keep the
HF modules (runner.py). Greedy output equals `model.generate` on CPU (tests/engine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.attention import PagedMetadata, prefill_attention, write_rows
from dynabatch.worker_svc.engine.fusion import FUSABLE_TYPES, LinearPart

# One layer's tensors: input norm, fused q/k/v (weight, bias), q/k norms, o (weight, bias),
# post-attention norm, fused gate/up (weight, bias), down (weight, bias). None where absent.
Weights = tuple[torch.Tensor | None, ...]
_IN, _QKV, _QKV_B, _QN, _KN, _O, _O_B, _POST, _GU, _GU_B, _DOWN, _DOWN_B = range(12)


def supports_lean_prefill(model: PreTrainedModel) -> bool:
    base = model.base_model
    return (getattr(model.config, "model_type", None) in FUSABLE_TYPES
            and all(hasattr(base, n) for n in ("embed_tokens", "rotary_emb", "layers", "norm"))
            and getattr(model.config, "hidden_act", None) == "silu"
            and all(isinstance(layer.self_attn.q_proj, LinearPart)
                    and isinstance(layer.mlp.gate_proj, LinearPart) for layer in base.layers))


@dataclass(frozen=True)
class _Shape:
    """The ints the pieces need, closed over (constants to torch.compile, not symbols)."""
    heads: int
    kv_heads: int
    head_dim: int
    qkv_splits: tuple[int, ...]
    inter: int
    eps: float              # every RMSNorm's (transformers' Llama family: config.rms_norm_eps)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: in fp32, cast back, then scaled by the weight."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * y.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated as transformers' apply_rotary_pos_emb (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _pieces(s: _Shape) -> tuple[Callable, Callable, Callable]:
    """(attention_inputs, between, last): the code before the first attention; from one
    layer's attention output to the next layer's attention inputs; from the last layer's
    attention output to the final norm of the rows whose logits are wanted."""

    def attention_inputs(h: torch.Tensor, w: Weights, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, hidden] -> q [T, H, D], new K/V [2, T, KVH, D]."""
        t, d = h.shape[0], s.head_dim
        qkv = F.linear(_rms(h, w[_IN], s.eps), w[_QKV], w[_QKV_B])
        q, k, v = qkv.split(s.qkv_splits, dim=-1)
        if w[_QN] is None:             # q and k rotated together: one pass over both
            qk = _rope(torch.cat((q, k), dim=-1).view(t, -1, d), cos, sin)
            q, k = qk[:, : s.heads], qk[:, s.heads:]
        else:
            q = _rope(_rms(q.view(t, -1, d), w[_QN], s.eps), cos, sin)
            k = _rope(_rms(k.view(t, -1, d), w[_KN], s.eps), cos, sin)
        return q.contiguous(), torch.stack((k, v.view(t, -1, d)))

    def layer_end(h: torch.Tensor, o: torch.Tensor, w: Weights) -> torch.Tensor:
        h = h + F.linear(o.flatten(1), w[_O], w[_O_B])
        gate, up = F.linear(_rms(h, w[_POST], s.eps), w[_GU], w[_GU_B]).split(s.inter, dim=-1)
        return h + F.linear(F.silu(gate) * up, w[_DOWN], w[_DOWN_B])

    def between(h: torch.Tensor, o: torch.Tensor, w: Weights, w_next: Weights,
                cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = layer_end(h, o, w)
        return (h, *attention_inputs(h, w_next, cos, sin))

    def last(h: torch.Tensor, o: torch.Tensor, w: Weights, norm: torch.Tensor,
             keep: torch.Tensor) -> torch.Tensor:
        return _rms(layer_end(h, o, w).index_select(0, keep), norm, s.eps)

    return attention_inputs, between, last


def _weights(layer: torch.nn.Module) -> Weights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gu = attn.q_proj._fused, mlp.gate_proj._fused
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return (layer.input_layernorm.weight, qkv.weight, qkv.bias,
            None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
            attn.o_proj.weight, attn.o_proj.bias, layer.post_attention_layernorm.weight,
            gu.weight, gu.bias, mlp.down_proj.weight, mlp.down_proj.bias)


class LeanPrefill:
    """ids/pos [T] -> logits [len(keep), V] over the paged cache (same contract as the HF
    forward in runner.py)."""

    def __init__(self, model: PreTrainedModel, compiled: bool,
                 rope: torch.Tensor | None = None) -> None:
        """`rope`: compiled.static_rope_table's cos/sin per position (None: the model's rotary
        module computes them each step)."""
        base, config = model.base_model, model.config
        self.embed, self.rotary = base.embed_tokens, base.rotary_emb
        self.norm_weight = base.norm.weight
        self.head = model.get_output_embeddings()
        attn = base.layers[0].self_attn
        shape = _Shape(config.num_attention_heads, config.num_key_value_heads, attn.head_dim,
                       tuple(attn.q_proj._fused.splits), config.intermediate_size,
                       base.layers[0].input_layernorm.variance_epsilon)
        self.scale = attn.scaling
        self.rope = rope
        self.weights = [_weights(layer) for layer in base.layers]
        pieces = _pieces(shape)
        if compiled:
            pieces = tuple(torch.compile(f) for f in pieces)
        self.first, self.between, self.last = pieces
        self.compiled = compiled

    def _inputs(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states and cos/sin [T, 1, D]; the token dims marked dynamic for compile."""
        h = F.embedding(ids, self.embed.weight)
        if self.rope is None:
            cos, sin = self.rotary(h[None], pos[None])          # [1, T, D]
            cos, sin = cos[0, :, None], sin[0, :, None]
        else:
            cos, sin = self.rope[pos, :, None].unbind(1)
        for t in (h, cos, sin, keep):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return h, cos, sin

    @torch.inference_mode()
    def warm_up(self, device: torch.device) -> None:
        """Compile every graph variant before serving (a first prefill would wait seconds):
        one token and one kept row are specialised by torch.compile, more are dynamic."""
        if not self.compiled:
            return
        w = self.weights
        for t, k in ((1, 1), (2, 1), (3, 2), (5, 3)):
            ids = torch.zeros(t, dtype=torch.int64, device=device)
            keep = torch.arange(k, device=device)
            h, cos, sin = self._inputs(ids, torch.arange(t, device=device), keep)
            q, _ = self.first(h, w[0], cos, sin)
            h, q, _ = self.between(h, q, w[0], w[min(1, len(w) - 1)], cos, sin)
            self.last(h, q, w[-1], self.norm_weight, keep)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, meta: PagedMetadata,
                 keep: torch.Tensor) -> torch.Tensor:
        h, cos, sin = self._inputs(ids, pos, keep)
        q, kv_new = self.first(h, self.weights[0], cos, sin)
        n = len(self.weights)
        for i in range(n):
            write_rows(meta.kv, i, kv_new, meta.write_rows)
            o = prefill_attention(q, meta.kv, i, meta, self.scale, kv_new[0], kv_new[1])
            if i + 1 < n:
                h, q, kv_new = self.between(h, o, self.weights[i], self.weights[i + 1], cos, sin)
        h = self.last(h, o, self.weights[-1], self.norm_weight, keep)
        return F.linear(h, self.head.weight, self.head.bias)
