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
    """The kernel stores the new K/V at its slot and attends like the reference over the
    context that includes it."""
    from dynabatch.worker_svc.engine.triton_decode import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks, bf16 = 400, torch.bfloat16
    ctx = [1, 7, 16, 17, 100, 255, 256, 513, 1000]
    batch = len(ctx)
    kv = torch.randn(1, 2, num_blocks + 1, kv_heads, block, dim, device="cuda", dtype=bf16,
                     generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).add(1).tolist()
    tables = [torch.tensor([perm.pop() for _ in range(-(-c // block))], device="cuda")
              for c in ctx]
    table = torch.zeros(batch, max(len(t) for t in tables), dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    write_blocks = torch.stack([t[(c - 1) // block] for t, c in zip(tables, ctx)])
    write_offsets = torch.tensor([(c - 1) % block for c in ctx], device="cuda")
    q = torch.randn(batch, heads, dim, device="cuda", dtype=bf16, generator=gen)
    k_new = torch.randn(batch, kv_heads, dim, device="cuda", dtype=bf16, generator=gen)
    v_new = torch.randn(batch, kv_heads, dim, device="cuda", dtype=bf16, generator=gen)
    want_kv = kv.clone()
    want_kv[0, 0][write_blocks, :, write_offsets] = k_new
    want_kv[0, 1][write_blocks, :, write_offsets] = v_new
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    got = paged_decode(q, k_new, v_new, kv[0, 0], kv[0, 1], write_blocks, write_offsets, table,
                       ctx_t, dim ** -0.5)
    assert torch.equal(kv, want_kv)
    meta = PagedMetadata(kv=want_kv, write_blocks=write_blocks, write_offsets=write_offsets,
                         block_tables=table, context_lens=ctx_t, decode=False,
                         query_lens=[1] * batch, context_lens_host=ctx, seq_blocks=tables)
    want = reference_paged_attention(q.float(), want_kv[0, 0].float(), want_kv[0, 1].float(),
                                     meta, dim ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("num_kv_blocks", [256, 16])
def test_graph_and_compiled_decode_match_eager_decode(num_kv_blocks: int) -> None:
    """Overlapped steps on a real stream (pinned staging, tokens read a step late), with
    preemptions in the small pool and prompts prefilled in chunks: every mode gives the same
    tokens (prefill from graphs or unpadded, decode eager, from graphs or compiled, decodes
    riding along prefill steps)."""
    prompts = [[(7 * i + j) % 256 for j in range(5 + 13 * i)] for i in range(5)]
    results = []
    for graphs, compiled, prefill_graphs, mixed in (
            (False, False, False, False), (True, False, True, False), (True, True, True, False),
            (True, True, False, False), (True, True, True, True), (False, False, False, True)):
        engine = build_engine("tiny-random-llama", device="cuda", dtype=torch.float32,
                              num_kv_blocks=num_kv_blocks, max_running=8, cuda_graphs=graphs,
                              compile_decode=compiled, prefill_graphs=prefill_graphs,
                              prefill_token_budget=40, mixed_steps=mixed)
        assert (engine.runner.prefill_graphs is not None) == prefill_graphs
        for i, p in enumerate(prompts):
            engine.add(SequenceRequest(f"r{i}", p, 24, ignore_eos=True))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        assert engine.stats().kv_blocks_used == 0
        assert (engine.stats().preemptions > 0) == (num_kv_blocks == 16)
        assert all(len(t) == 24 for t in out.values())
        results.append(out)
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("fresh", [True, False])
def test_varlen_prefill_matches_reference(fresh: bool) -> None:
    """Prefill's one flash-attention call per layer attends like the per-sequence reference:
    whole fresh prompts, and chunks continuing a cached context (causal at the context's end),
    with fewer K/V heads than query heads."""
    import numpy as np

    from dynabatch.worker_svc.engine.attention import (prefill_attention, varlen_plan,
                                                       write_kv)

    gen = torch.Generator(device="cuda").manual_seed(1)
    heads, kv_heads, dim, bs, num_blocks, bf16 = 32, 8, 64, 16, 300, torch.bfloat16
    q_lens = [5, 64, 17, 1, 300]
    starts = [0] * 5 if fresh else [0, 30, 100, 7, 1000]
    ends = [s + n for s, n in zip(starts, q_lens)]
    kv = torch.randn(1, 2, num_blocks + 1, kv_heads, bs, dim, device="cuda", dtype=bf16,
                     generator=gen)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).add(1).tolist()
    tables = [np.array([perm.pop() for _ in range(-(-e // bs))]) for e in ends]
    positions = [np.arange(s, e) for s, e in zip(starts, ends)]
    wb = torch.tensor(np.concatenate([t[p // bs] for t, p in zip(tables, positions)]),
                      device="cuda")
    wo = torch.tensor(np.concatenate(positions) % bs, device="cuda")
    total = sum(q_lens)
    q = torch.randn(total, heads, dim, device="cuda", dtype=bf16, generator=gen)
    k_new = torch.randn(total, kv_heads, dim, device="cuda", dtype=bf16, generator=gen)
    v_new = torch.randn(total, kv_heads, dim, device="cuda", dtype=bf16, generator=gen)
    k_cache, v_cache = write_kv(kv, 0, k_new, v_new, wb, wo)
    meta = PagedMetadata(kv=kv, write_blocks=wb, write_offsets=wo, block_tables=wb[:0],
                         context_lens=wb[:0], decode=False, query_lens=q_lens,
                         context_lens_host=ends,
                         seq_blocks=[torch.tensor(t, device="cuda") for t in tables])
    want = reference_paged_attention(q.float(), k_cache.float(), v_cache.float(), meta,
                                     dim ** -0.5)
    meta.varlen = varlen_plan(starts, ends, tables, kv)
    assert (meta.varlen.ctx_rows is None) == fresh
    got = prefill_attention(q, kv, 0, meta, dim ** -0.5, k_new, v_new)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("compiled", [False, True])
def test_graph_decode_with_gemv_matches_cublas(compiled: bool, monkeypatch) -> None:
    """Decode graphs with the Triton GEMV (the CUDA default: buckets 1 and 2) give the tokens of
    cuBLAS-only graphs (gemv_rows=0), fp32, at decode batches 4 down to 1; the GEMV runs only
    while the batch-1 and -2 graphs are captured (warm-up and capture: twice per layer each)."""
    from collections import Counter

    from dynabatch.worker_svc.engine import triton_gemv

    calls: list[int] = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda x, w, b=None, config=None, **fused:
                        (calls.append(x.shape[0]), real(x, w, b, config, **fused))[1])
    prompts = [[(5 * i + j) % 256 for j in range(3 + 11 * i)] for i in range(4)]
    results = []
    for gemv_rows in (0, None):
        calls.clear()
        engine = build_engine("tiny-random-llama", device="cuda", dtype=torch.float32,
                              num_kv_blocks=256, max_running=4, compile_decode=compiled,
                              gemv_rows=gemv_rows)
        on = gemv_rows is None
        assert engine.runner.gemv_rows == (2 if on else 0)
        assert engine.runner.graphs.buckets == ([1, 2, 4] if on or not compiled else [2, 4])
        linears = 2 * 4 + 1                   # 2 layers x (qkv, o, gate_up, down), lm_head
        assert Counter(calls) == ({1: 2 * linears, 2: 2 * linears} if on else {})
        calls.clear()
        for i, p in enumerate(prompts):
            engine.add(SequenceRequest(f"r{i}", p, 6 * (i + 1), ignore_eos=True))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        assert not calls                      # replays only
        assert all(len(out[f"r{i}"]) == 6 * (i + 1) for i in range(4))
        results.append(out)
    assert results[0] == results[1]


def test_back_to_back_partial_chunks_under_a_small_step_cap() -> None:
    """A long prompt alone under a 16-token step cap: ~60 prefill steps with nothing to read
    back, which the host enqueues faster than the GPU runs them (1B shape). Each must wait for
    the one before (PagedEngine._marker): refilled before their copies ran, the pinned staging
    buffers gave later steps garbage rows, a device-side index assert (session 15, live 8B)."""
    prompt = [(11 * j) % 256 for j in range(1000)]
    runs = []
    for _ in range(2):
        engine = build_engine("llama-3.2-1b-shape", device="cuda", num_kv_blocks=256,
                              max_running=4, compile_decode=False, compile_prefill=False,
                              mixed_steps=True)
        engine.set_step_prefill_tokens(16)
        engine.add(SequenceRequest("long", prompt, 8, ignore_eos=True))
        out, steps = [], 0
        while engine.has_work():
            out += [t for o in engine.step() for t in o.token_ids]
            steps += 1
        torch.cuda.synchronize()
        assert steps >= 1000 // 16 and len(out) == 8
        assert engine.stats().kv_blocks_used == 0
        runs.append(out)
    assert runs[0] == runs[1]
