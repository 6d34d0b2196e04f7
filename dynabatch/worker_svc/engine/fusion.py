"""The modules that stand in for the HF models' nn.Linear layers on the decode path.

One GEMM for projections that read the same input (q/k/v, gate/up) in Llama-family layers: a
decode step is memory-bound and its small GEMMs run well below bandwidth, so reading the
concatenated weight once beats three (or two) launches. transformers' modules call each
projection separately, so the fused module computes every part on its first part's call and
hands the rest out in call order (q, k, v in attention; gate, up in the MLP — true for the
architectures listed below). A part called out of order finds no result and raises.

Small decode batches through the Triton GEMV (`use_gemv`): at 1-2 rows cuBLAS leaves a linear
layer's weight read well below bandwidth, the weight-streaming kernel (triton_gemv.py, the
opaque op `dynabatch::gemv`) is 1.05-1.26x faster at one row, about even at two, slower from
four (bench/results/engine_h200.md, session 6, H100). The choice is a Python check of the row
count: torch.compile guards on it (one layer graph for <= `gemv_rows` rows, one for more, each
compiled at start-up), and each CUDA graph bucket captures one side of it, so nothing branches
on data at run time. Only the decode path calls these modules once the prefill is the lean
one (prefill.py reads the weights and calls F.linear itself): runner.py turns the GEMV on only
then.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           gemv_rows: int = 0) -> torch.Tensor:
    """F.linear, or dynabatch::gemv where x has 1..`gemv_rows` rows (0: never)."""
    rows = math.prod(x.shape[:-1])
    if not gemv_rows or rows > gemv_rows:
        return F.linear(x, weight, bias)
    y = torch.ops.dynabatch.gemv(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])

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
        self.gemv_rows = 0                  # use_gemv's
        self._parts: tuple[torch.Tensor, ...] | None = None

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            out = linear(x, self.weight, self.bias, self.gemv_rows)
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


class GemvLinear(nn.Module):
    """Stands in for an unfused nn.Linear (o, down, lm_head): its parameters, through linear()."""

    def __init__(self, lin: nn.Linear, gemv_rows: int) -> None:
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias       # shared (a tied lm_head stays tied)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.gemv_rows = gemv_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv_rows)


def use_gemv(model: nn.Module, rows: int) -> int:
    """Route every linear layer of `model` (fused or not, lm_head included) through
    dynabatch::gemv for inputs of 1..`rows` rows (1..16); returns how many layers."""
    from dynabatch.worker_svc.engine import triton_gemv    # registers the op; needs triton

    if not 0 < rows <= triton_gemv.MAX_ROWS:
        raise ValueError(f"gemv rows must be in 1..{triton_gemv.MAX_ROWS}, got {rows}")
    count = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, GemvLinear(child, rows))
            elif isinstance(child, FusedLinear):
                child.gemv_rows = rows
            else:
                continue
            count += 1
    return count
