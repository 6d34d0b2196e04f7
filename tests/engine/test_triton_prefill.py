"""The Triton paged prefill kernel against the torch reference (reference_paged_attention).

Chunks of fresh prompts and continued chunks (queries at the end of a longer cached context),
grouped-query heads, a block table wider than needed and padded tiles/sequences, as the
prefill graphs launch it. Without CUDA the kernel runs in Triton's interpreter (conftest.py).
"""
from __future__ import annotations

from types import ModuleType

import pytest
import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata, reference_paged_attention

pytest.importorskip("triton")

from engine.conftest import interpreted_module, needs_cuda  # noqa: E402

# (query count, context length) per chunk: fresh prompts (equal) and continued chunks.
CHUNKS = [(1, 1), (5, 5), (16, 16), (17, 40), (3, 70), (33, 33), (1, 9)]


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    return interpreted_module("triton_prefill")


def _check(mod: ModuleType, chunks: list[tuple[int, int]], heads: int, kv_heads: int, dim: int,
           block: int, device: str, dtype: torch.dtype, tol: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block) for _, c in chunks) + 3
    kv = torch.randn(2, num_blocks + 1, kv_heads, block, dim, generator=gen).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=gen).add(1).tolist()
    blocks = [[perm.pop() for _ in range(-(-c // block))] for _, c in chunks]
    rows = list(range(len(chunks)))[::-1]               # table rows in another order
    table = torch.zeros(len(chunks) + 2, max(map(len, blocks)) + 2, dtype=torch.int32)
    for r, b in zip(rows, blocks):
        table[r, : len(b)] = torch.tensor(b)
    q_lens = [n for n, _ in chunks]
    total = sum(q_lens)
    q = torch.randn(total, heads, dim, generator=gen).to(device, dtype)
    pad_seqs, pad_tiles = 2, 3
    starts = torch.tensor([0, *q_lens]).cumsum(0)[:-1].tolist()
    seqs = torch.zeros(4, len(chunks) + pad_seqs, dtype=torch.int64)
    for i, ((n, c), s, r) in enumerate(zip(chunks, starts, rows)):
        seqs[:, i] = torch.tensor([s, n, c, r])
    tiles = torch.from_numpy(mod.plan_tiles(q_lens, mod.max_tiles(total, len(chunks)) + pad_tiles))
    scale = dim ** -0.5
    got = mod.paged_prefill(q, kv[0], kv[1], tiles.to(device), seqs.to(device),
                            table.to(device), scale)
    meta = PagedMetadata(kv=kv, write_blocks=q, write_offsets=q, block_tables=table,
                         context_lens=table, decode=False, query_lens=q_lens,
                         context_lens_host=[c for _, c in chunks],
                         seq_blocks=[torch.tensor(b, device=device) for b in blocks])
    want = reference_paged_attention(q.float(), kv[0].float(), kv[1].float(), meta, scale)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_tiles_cover_every_query_once(interpreted: ModuleType) -> None:
    tiles = interpreted.plan_tiles([1, 16, 17, 40], 12)
    listed = [(int(c), int(m)) for c, m in tiles.T if c >= 0]
    assert listed == [(0, 0), (1, 0), (2, 0), (2, 16), (3, 0), (3, 16), (3, 32)]
    assert (tiles[0, len(listed):] == -1).all()
    assert interpreted.max_tiles(1 + 16 + 17 + 40, 4) >= len(listed)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 4)])
def test_matches_reference(interpreted: ModuleType, heads: int, kv_heads: int) -> None:
    _check(interpreted, CHUNKS, heads, kv_heads, 16, 16, "cpu", torch.float32, 1e-4)


def test_block_size_smaller_than_a_tile(interpreted: ModuleType) -> None:
    _check(interpreted, [(9, 30), (20, 20)], 4, 2, 16, 4, "cpu", torch.float32, 1e-4, seed=1)


@needs_cuda
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_bf16(dim: int) -> None:
    from dynabatch.worker_svc.engine import triton_prefill

    chunks = CHUNKS + [(300, 300), (129, 1000)]
    _check(triton_prefill, chunks, 32, 8, dim, 16, "cuda", torch.bfloat16, 2e-2)
