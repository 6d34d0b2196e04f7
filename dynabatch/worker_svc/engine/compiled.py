"""Decode forward with the decoder layers run through torch.compile ("regional" compilation).

All layers of a Llama-family model (Llama, Qwen2/3, Mistral: embed_tokens, rotary_emb, layers,
norm, lm_head) share one compiled layer function, so compile time is one layer's, not the whole
model's. Inductor fuses each layer's norms, rotary embedding, activation and residual adds
around the opaque paged-decode op. The layer's index reaches the op as a CPU scalar tensor (not
the module's int attribute), so the 16 or 32 layers share one graph. (Making the modules' ints
symbolic instead, with allow_unspec_int_on_nn_module, also made head_dim and the fused
projections' split sizes symbolic: the pointwise kernels then indexed with runtime divisions,
e.g. the MLP activation took 3-6 us per layer instead of 2 at batch 64 on an H200.)
Prefill is compiled in pieces of its own (prefill.py).

Outside the layers, the final norm is compiled too (one kernel instead of seven), and the
rotary cos/sin come from a table the model's own rotary module filled once at start-up (one
gather instead of eight kernels recomputing them each step: the values are the same, each being
one fp32 product inv_freq x position before cos/sin).
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import PreTrainedModel

from dynabatch.worker_svc.engine.attention import PagedMetadata, layer_index

Forward = Callable[[torch.Tensor, torch.Tensor, PagedMetadata, None], torch.Tensor]


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor,
               meta: PagedMetadata, index: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=pos,
                use_cache=False, paged_metadata=meta, paged_layer=index)
    return out[0] if isinstance(out, tuple) else out


_PARTS = ("embed_tokens", "rotary_emb", "layers", "norm")


def supports_compiled_decode(model: PreTrainedModel) -> bool:
    """True for the Llama-family layout this module drives."""
    return all(hasattr(model.base_model, name) for name in _PARTS)


def _run_module(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@torch.inference_mode()
def rope_table(model: PreTrainedModel, positions: int) -> torch.Tensor:
    """[positions, 2, head_dim]: cos and sin of every position, from the model's rotary module
    (in the embedding's dtype and device, as the module returns them for hidden states)."""
    base = model.base_model
    weight = base.embed_tokens.weight
    pos = torch.arange(positions, device=weight.device)[None]
    cos, sin = base.rotary_emb(weight[:1, None], position_ids=pos)
    return torch.stack([cos[0], sin[0]], dim=1)


def static_rope_table(model: PreTrainedModel, positions: int) -> torch.Tensor | None:
    """rope_table, or None where the model's cos/sin change at run time: dynamic NTK scaling
    moves inv_freq with the longest position seen, so they are recomputed per step."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None or "dynamic" in str(getattr(rotary, "rope_type", "")):
        return None
    return rope_table(model, positions)


def compiled_decode_forward(model: PreTrainedModel, table: torch.Tensor | None) -> Forward:
    """`table`: static_rope_table's (None: the rotary module runs every step)."""
    base = model.base_model
    if not supports_compiled_decode(model):
        raise ValueError(f"compile_decode needs a Llama-family model ({type(base).__name__} "
                         f"lacks one of {_PARTS})")
    head = model.get_output_embeddings()
    layer_fn = torch.compile(_run_layer, dynamic=True)
    norm_fn = torch.compile(_run_module, dynamic=True)

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: PagedMetadata,
                keep: None) -> torch.Tensor:
        hidden = base.embed_tokens(ids[None])
        position_ids = pos[None]
        rope = (base.rotary_emb(hidden, position_ids=position_ids) if table is None
                else table[pos][None].unbind(2))     # ([1, n, D], [1, n, D])
        for i, layer in enumerate(base.layers):
            hidden = layer_fn(layer, hidden, rope, position_ids, meta, layer_index(i))
        return head(norm_fn(base.norm, hidden))[0]

    return forward
