"""The paged reference attention equals plain SDPA over contiguous K/V."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynabatch.worker_svc.engine.attention import PagedMetadata, reference_paged_attention

H, KVH, D, BS = 8, 2, 16, 4


def _scatter_into_pool(ks: list[torch.Tensor], vs: list[torch.Tensor], num_blocks: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random (shuffled) block placement of each sequence's [KVH, n, D] K/V."""
    kv = torch.randn(1, 2, num_blocks + 1, KVH, BS, D, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).add(1).tolist()
    tables = []
    for k, v in zip(ks, vs):
        n = k.shape[1]
        blocks = [free.pop() for _ in range(-(-n // BS))]
        for i in range(n):
            kv[0, 0, blocks[i // BS], :, i % BS] = k[:, i]
            kv[0, 1, blocks[i // BS], :, i % BS] = v[:, i]
        tables.append(torch.tensor(blocks))
    return kv, tables


@pytest.mark.parametrize("q_lens", [[5, 1, 12], [1, 1, 1, 1], [3, 9]])
def test_reference_matches_sdpa(q_lens: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(q_lens))
    ctx_lens = [q + int(torch.randint(0, 20, (1,), generator=gen)) for q in q_lens]
    ks = [torch.randn(KVH, c, D, generator=gen) for c in ctx_lens]
    vs = [torch.randn(KVH, c, D, generator=gen) for c in ctx_lens]
    kv, tables = _scatter_into_pool(ks, vs, 64, gen)
    q = torch.randn(sum(q_lens), H, D, generator=gen)
    empty = torch.empty(0, dtype=torch.long)
    meta = PagedMetadata(kv=kv, write_blocks=empty, write_offsets=empty, block_tables=empty,
                         context_lens=empty, decode=False, query_lens=q_lens,
                         context_lens_host=ctx_lens, seq_blocks=tables)
    out = reference_paged_attention(q, kv[0, 0], kv[0, 1], meta, D ** -0.5)
    start = 0
    for q_len, ctx, k, v in zip(q_lens, ctx_lens, ks, vs):
        qs = q[start:start + q_len].transpose(0, 1)                   # [H, L, D]
        # Plain attention: expand K/V to every query head, explicit bottom-right causal mask.
        k_full = k.repeat_interleave(H // KVH, dim=0)
        v_full = v.repeat_interleave(H // KVH, dim=0)
        mask = torch.ones(q_len, ctx, dtype=torch.bool).tril(diagonal=ctx - q_len)
        want = F.scaled_dot_product_attention(qs, k_full, v_full, attn_mask=mask)
        torch.testing.assert_close(out[start:start + q_len], want.transpose(0, 1),
                                   rtol=1e-5, atol=1e-5)
        start += q_len


def test_fresh_runs_batched_path_matches_gathered_path() -> None:
    """Equal-length fresh chunks take one batched SDPA; same result as gathering from blocks."""
    gen = torch.Generator().manual_seed(3)
    q_lens = [6, 6, 6, 3, 6]
    ks = [torch.randn(KVH, n, D, generator=gen) for n in q_lens]
    vs = [torch.randn(KVH, n, D, generator=gen) for n in q_lens]
    kv, tables = _scatter_into_pool(ks, vs, 64, gen)
    q = torch.randn(sum(q_lens), H, D, generator=gen)
    empty = torch.empty(0, dtype=torch.long)
    meta = PagedMetadata(kv=kv, write_blocks=empty, write_offsets=empty, block_tables=empty,
                         context_lens=empty, decode=False, query_lens=q_lens,
                         context_lens_host=q_lens, seq_blocks=tables)
    k_new = torch.cat([k.transpose(0, 1) for k in ks])
    v_new = torch.cat([v.transpose(0, 1) for v in vs])
    fast = reference_paged_attention(q, kv[0, 0], kv[0, 1], meta, D ** -0.5, k_new, v_new)
    slow = reference_paged_attention(q, kv[0, 0], kv[0, 1], meta, D ** -0.5)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_kv_rows_write_and_read_the_slots_of_write_kv() -> None:
    """A step's K/V written through kv_rows (one index_copy_ per layer) lands where write_kv's
    per-slot indexing puts it, in the right layer only, and reads back by the same rows."""
    from dynabatch.worker_svc.engine.attention import kv_rows, write_kv, write_rows

    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(3, 2, 10, KVH, BS, D, generator=gen)
    blocks = torch.tensor([4, 4, 9, 1, 7])
    offsets = torch.tensor([0, 3, 2, 1, 3])
    k, v = torch.randn(2, 5, KVH, D, generator=gen).unbind(0)
    want = kv.clone()
    write_kv(want, 1, k, v, blocks, offsets)
    got = kv.clone()
    rows = kv_rows(got, blocks, offsets)
    write_rows(got, 1, torch.stack((k, v)), rows)
    assert torch.equal(got, want)
    back = got[1].view(-1, D)[rows.flatten()].view(2, 5, KVH, D)
    assert torch.equal(back[0], k) and torch.equal(back[1], v)
