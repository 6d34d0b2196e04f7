"""CUDA-only checks: the Triton decode kernel and graph replay against the reference path."""
from __future__ import annotations

import pytest
import torch

from dynabatch.worker_svc.engine import SequenceRequest, build_engine
from dynabatch.worker_svc.engine.attention import PagedMetadata, reference_paged_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 8, 64, 16), (16, 2, 128, 16),
                                                      (8, 8, 64, 32)])
def test_triton_decode_matches_reference(heads: int, kv_heads: int, dim: int, block: int) -> None:
    from dynabatch.worker_svc.engine.triton_decode import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, num_blocks = 9, 400
    kv = torch.randn(1, 2, num_blocks + 1, kv_heads, block, dim, device="cuda",
                     dtype=torch.bfloat16, generator=gen)
    ctx = [1, 7, 16, 17, 100, 255, 256, 513, 1000]
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).add(1).tolist()
    tables = []
    for c in ctx:
        tables.append(torch.tensor([perm.pop() for _ in range(-(-c // block))], device="cuda"))
    width = max(len(t) for t in tables)
    table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    got = paged_decode(q, kv[0, 0], kv[0, 1], table, ctx_t, dim ** -0.5)
    empty = torch.empty(0, dtype=torch.long, device="cuda")
    meta = PagedMetadata(kv=kv, write_blocks=empty, write_offsets=empty, block_tables=table,
                         context_lens=ctx_t, decode=False, query_lens=[1] * batch,
                         context_lens_host=ctx, seq_blocks=tables)
    want = reference_paged_attention(q.float(), kv[0, 0].float(), kv[0, 1].float(), meta,
                                     dim ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_graph_and_compiled_decode_match_eager_decode() -> None:
    prompts = [[(7 * i + j) % 256 for j in range(5 + 13 * i)] for i in range(5)]
    results = []
    for graphs, compiled in ((False, False), (True, False), (True, True)):
        engine = build_engine("tiny-random-llama", device="cuda", dtype=torch.float32,
                              num_kv_blocks=256, max_running=8, cuda_graphs=graphs,
                              compile_decode=compiled)
        for i, p in enumerate(prompts):
            engine.add(SequenceRequest(f"r{i}", p, 24, ignore_eos=True))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        assert engine.stats().kv_blocks_used == 0
        results.append(out)
    assert results[0] == results[1] == results[2]
