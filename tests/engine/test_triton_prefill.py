"""The Triton paged prefill kernel against the torch reference (reference_paged_attention).

Chunks of fresh prompts and continued chunks (queries at the end of a longer cached context),
grouped-query heads, a block table wider than needed and padded tiles/sequences, as the
prefill graphs launch it; and tiles cut into pieces of context (split context), merged after.
Without CUDA the kernel runs in Triton's interpreter (conftest.py).
"""
from __future__ import annotations

from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynabatch.worker_svc.engine.attention import PagedMetadata, reference_paged_attention

pytest.importorskip("triton")

from engine.conftest import interpreted_module, needs_cuda  # noqa: E402

# (query count, context length) per chunk: fresh prompts (equal) and continued chunks.
CHUNKS = [(1, 1), (5, 5), (16, 16), (17, 40), (3, 70), (33, 33), (1, 9)]


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    return interpreted_module("triton_prefill")


def _check(mod: ModuleType, chunks: list[tuple[int, int]], heads: int, kv_heads: int, dim: int,
           block: int, device: str, dtype: torch.dtype, tol: float, seed: int = 0,
           target: int = 0, slots: int = 0) -> int:
    """Kernel vs reference; `target`/`slots`: plan's split settings. Returns the split tiles."""
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
    width = mod.max_tiles(total, len(chunks)) + slots + pad_tiles
    items, merges = mod.plan(q_lens, [c for _, c in chunks], width, slots, target)
    scratch = mod.Scratch.make(slots, heads, kv_heads, dim, torch.device(device))
    scale = dim ** -0.5
    got = mod.paged_prefill(q, kv[0], kv[1], torch.from_numpy(items).to(device),
                            torch.from_numpy(merges).to(device), seqs.to(device),
                            table.to(device), scale, scratch)
    meta = PagedMetadata(kv=kv, write_blocks=q, write_offsets=q, block_tables=table,
                         context_lens=table, decode=False, query_lens=q_lens,
                         context_lens_host=[c for _, c in chunks],
                         seq_blocks=[torch.tensor(b, device=device) for b in blocks])
    want = reference_paged_attention(q.float(), kv[0].float(), kv[1].float(), meta, scale)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    return int((merges[0] >= 0).sum())


def test_tiles_cover_every_query_once(interpreted: ModuleType) -> None:
    items, merges = interpreted.plan([1, 16, 17, 40], [1, 16, 17, 40], 12, 0, 100)
    listed = [(int(c), int(m)) for c, m in items[:2].T if c >= 0]
    assert listed == [(0, 0), (1, 0), (2, 0), (2, 16), (3, 0), (3, 16), (3, 32)]
    assert (items[0, len(listed):] == -1).all() and (items[4, : len(listed)] == -1).all()
    assert interpreted.max_tiles(1 + 16 + 17 + 40, 4) >= len(listed)
    assert merges.shape == (4, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 80), st.integers(0, 3000)), min_size=1, max_size=12),
       st.integers(1, 40), st.integers(0, 24))
def test_plan_covers_each_tiles_context_once(interpreted: ModuleType, chunks, target: int,
                                             slots: int) -> None:
    """Every tile's positions [0, hi) are covered by its items exactly once, each split tile's
    pieces hold distinct slots within `slots`, and its merge lists them all."""
    q_lens = [n for n, _ in chunks]
    ctx = [n + extra for n, extra in chunks]
    width = interpreted.max_tiles(sum(q_lens), len(q_lens)) + slots
    items, merges = interpreted.plan(q_lens, ctx, width, slots, target)
    live = items[:, items[0] >= 0]
    pieces: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for c, m0, lo, hi, slot in live.T.tolist():
        pieces.setdefault((c, m0), []).append((lo, hi, slot))
    bm = interpreted.BLOCK_M
    want = {(c, m0) for c, n in enumerate(q_lens) for m0 in range(0, n, bm)}
    assert set(pieces) == want
    merged = {(c, m0): (first, count) for c, m0, first, count in merges.T.tolist() if c >= 0}
    slots_used = [s for ps in pieces.values() for _, _, s in ps if s >= 0]
    assert len(slots_used) == len(set(slots_used)) and all(s < slots for s in slots_used)
    for (c, m0), ps in pieces.items():
        hi = min(ctx[c], ctx[c] - q_lens[c] + m0 + bm)
        ps.sort()
        assert ps[0][0] == 0 and ps[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(ps, ps[1:]))
        if len(ps) == 1:
            assert ps[0][2] == -1 and (c, m0) not in merged
        else:
            assert merged[(c, m0)] == (ps[0][2], len(ps))
            assert [s for _, _, s in ps] == list(range(ps[0][2], ps[0][2] + len(ps)))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 4)])
def test_matches_reference(interpreted: ModuleType, heads: int, kv_heads: int) -> None:
    _check(interpreted, CHUNKS, heads, kv_heads, 16, 16, "cpu", torch.float32, 1e-4)


def test_block_size_smaller_than_a_tile(interpreted: ModuleType) -> None:
    _check(interpreted, [(9, 30), (20, 20)], 4, 2, 16, 4, "cpu", torch.float32, 1e-4, seed=1)


def test_split_context_matches_reference(interpreted: ModuleType, monkeypatch) -> None:
    """Decode rows (one query) and a chunk on long contexts, cut into pieces of 64 tokens:
    some rows of a tile see no position of a piece (past their query), and pieces past the
    slots left stay whole."""
    monkeypatch.setattr(interpreted, "MIN_PIECE", 64)
    chunks = [(1, 300), (1, 130), (20, 260), (1, 9), (3, 70)]
    split = _check(interpreted, chunks, 4, 2, 16, 16, "cpu", torch.float32, 1e-4, seed=2,
                   target=40, slots=9)
    assert split >= 2


@needs_cuda
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_bf16(dim: int) -> None:
    from dynabatch.worker_svc.engine import triton_prefill

    chunks = CHUNKS + [(300, 300), (129, 1000)]
    _check(triton_prefill, chunks, 32, 8, dim, 16, "cuda", torch.bfloat16, 2e-2)


@needs_cuda
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_bf16_split_context(dim: int) -> None:
    """A mixed step's shape: decode rows and a 64-token chunk at 4k-token contexts."""
    from dynabatch.worker_svc.engine import triton_prefill

    chunks = [(1, 4096)] * 6 + [(64, 4096), (1, 17), (5, 700)]
    split = _check(triton_prefill, chunks, 32, 8, dim, 16, "cuda", torch.bfloat16, 2e-2,
                   target=33, slots=66)
    assert split >= 7
