"""The modules that stand in for the HF models' nn.Linear layers on the decode path.

One GEMM for projections that read the same input (q/k/v, gate/up) in Llama-family layers: a
decode step is memory-bound and its small GEMMs run well below bandwidth, so reading the
concatenated weight once beats three (or two) launches. transformers' modules call each
projection separately, so the fused module computes every part on its first part's call and
hands the rest out in call order (q, k, v in attention; gate, up in the MLP — true for the
architectures listed below). A part called out of order finds no result and raises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSABLE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class FusedLinear(nn.Module):
    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
        biases = [lin.bias for lin in linears]
        self.bias = (nn.Parameter(torch.cat(biases), requires_grad=False)
                     if all(b is not None for b in biases) else None)
        self.splits = [lin.out_features for lin in linears]
        self._parts: tuple[torch.Tensor, ...] | None = None

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            out = F.linear(x, self.weight, self.bias)
            self._parts = out.split(self.splits, dim=-1)
        parts = self._parts
        if parts is None:
            raise RuntimeError("fused projection called out of order")
        if index == len(self.splits) - 1:
            self._parts = None           # hold no activations between calls
        return parts[index]


class LinearPart(nn.Module):
    """Stands in for one of the fused nn.Linear modules."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        self.fused = fused if index == 0 else None
        object.__setattr__(self, "_fused", fused)   # shared, registered once (on part 0)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused.part(self.index, x)


def fuse_projections(model: nn.Module) -> int:
    """Fuse in place; returns how many groups were fused (0 for other architectures)."""
    if getattr(model.config, "model_type", None) not in FUSABLE_TYPES:
        return 0
    count = 0
    for layer in model.base_model.layers:
        for owner_name, names in _GROUPS:
            owner = getattr(layer, owner_name, None)
            linears = [getattr(owner, n, None) for n in names]
            if owner is None or not all(type(lin) is nn.Linear for lin in linears):
                continue
            fused = FusedLinear(linears)
            for i, n in enumerate(names):
                setattr(owner, n, LinearPart(fused, i))
            count += 1
    return count
