"""Paged KV cache: a preallocated pool of fixed-size blocks and per-sequence block tables.

The pool owns one tensor per (layer, K/V) of shape [num_blocks + 1, kv_heads, block_size, head_dim].
Physical block 0 is a scratch block that is never handed out: padded rows of a CUDA-graph batch
write their K/V there and read it back, so padding never touches a live sequence's memory.
"""
from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

NULL_BLOCK = 0


class BlockAllocator:
    """Host-side free list over block ids 1..num_blocks; exact used/free accounting."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.total = num_blocks
        # Pop from the end: low ids are handed out first (deterministic layout for tests).
        self._free = list(range(num_blocks, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        if len(self._free) > self.total:
            raise RuntimeError("KV block freed twice")


class BlockTable:
    """The blocks one sequence holds, in logical order."""

    __slots__ = ("blocks",)

    def __init__(self) -> None:
        self.blocks: list[int] = []

    def capacity(self, block_size: int) -> int:
        return len(self.blocks) * block_size

    def ensure(self, allocator: BlockAllocator, num_tokens: int, block_size: int) -> bool:
        """Grow to hold num_tokens tokens; False (and unchanged) when the pool is short."""
        need = math.ceil(num_tokens / block_size) - len(self.blocks)
        if need <= 0:
            return True
        got = allocator.allocate(need)
        if got is None:
            return False
        self.blocks.extend(got)
        return True

    def release(self, allocator: BlockAllocator) -> None:
        allocator.release(self.blocks)
        self.blocks = []

    def slot(self, position: int, block_size: int) -> int:
        """Flat slot index (block * block_size + offset) of a token position."""
        return self.blocks[position // block_size] * block_size + position % block_size


def kv_bytes_per_block(config: PretrainedConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    heads, head_dim = kv_shape(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * heads * block_size * head_dim * itemsize


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of the model."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def blocks_from_memory(config: PretrainedConfig, block_size: int, dtype: torch.dtype,
                       device: torch.device, fraction: float) -> int:
    """How many blocks fit in `fraction` of the device memory still free now."""
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, int(free * fraction) // kv_bytes_per_block(config, block_size, dtype))


class KVCache:
    """The device tensors of the pool plus its allocator."""

    def __init__(self, config: PretrainedConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        kv_heads, head_dim = kv_shape(config)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        shape = (config.num_hidden_layers, 2, num_blocks + 1, kv_heads, block_size, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[layer_idx, 0], self.data[layer_idx, 1]

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size
