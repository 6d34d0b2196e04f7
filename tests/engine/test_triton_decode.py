"""The Triton paged-decode kernel (single pass and split-K) against the torch reference.

Without CUDA the kernels run in Triton's interpreter (numpy) on CPU tensors: conftest.py sets
TRITON_INTERPRET=1 before anything imports triton, since triton.jit picks the interpreter when
a kernel (or one of triton.language's own helpers) is defined. The module skips when triton is
not installed; the CUDA cases carry the gpu marker.
"""
from __future__ import annotations

from types import ModuleType

import pytest
import torch

from dynabatch.worker_svc.engine.attention import PagedMetadata, reference_paged_attention

triton = pytest.importorskip("triton")

from engine.conftest import interpreted_module, needs_cuda  # noqa: E402

CTX = [1, 5, 16, 17, 65, 150]


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    """triton_decode with its kernel(s) in the interpreter (CPU tensors)."""
    return interpreted_module("triton_decode")


def _case(ctx: list[int], heads: int, kv_heads: int, dim: int, block: int, device: str,
          dtype: torch.dtype, spare_cols: int = 3, seed: int = 0):
    """Random cache with shuffled blocks, block table wider than needed (as in a graph)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(ctx)
    num_blocks = sum(-(-c // block) for c in ctx) + 4
    kv = torch.randn(1, 2, num_blocks + 1, kv_heads, block, dim, generator=gen).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=gen).add(1).tolist()
    tables = [torch.tensor([perm.pop() for _ in range(-(-c // block))], device=device)
              for c in ctx]
    table = torch.zeros(batch, max(len(t) for t in tables) + spare_cols, dtype=torch.int32,
                        device=device)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    write_blocks = torch.stack([t[(c - 1) // block] for t, c in zip(tables, ctx)])
    write_offsets = torch.tensor([(c - 1) % block for c in ctx], device=device)
    q, k_new, v_new = (torch.randn(batch, h, dim, generator=gen).to(device, dtype)
                       for h in (heads, kv_heads, kv_heads))
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=device)
    return kv, tables, table, write_blocks, write_offsets, q, k_new, v_new, ctx_t


def _check(mod: ModuleType, ctx: list[int], heads: int, kv_heads: int, dim: int, block: int,
           splits: int | None, device: str, dtype: torch.dtype, tol: float) -> None:
    kv, tables, table, wb, wo, q, k_new, v_new, ctx_t = _case(ctx, heads, kv_heads, dim, block,
                                                              device, dtype)
    want_kv = kv.clone()
    want_kv[0, 0][wb, :, wo] = k_new
    want_kv[0, 1][wb, :, wo] = v_new
    got = mod.paged_decode(q, k_new, v_new, kv[0, 0], kv[0, 1], wb, wo, table, ctx_t,
                           dim ** -0.5, splits=splits)
    assert torch.equal(kv, want_kv), "the new K/V must land in its slot, and nothing else change"
    meta = PagedMetadata(kv=want_kv, write_blocks=wb, write_offsets=wo, block_tables=table,
                         context_lens=ctx_t, decode=False, query_lens=[1] * len(ctx),
                         context_lens_host=ctx, seq_blocks=tables)
    want = reference_paged_attention(q.float(), want_kv[0, 0].float(), want_kv[0, 1].float(),
                                     meta, dim ** -0.5)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference_cpu(interpreted: ModuleType, splits: int) -> None:
    """Contexts from 1 to a few chunks, mostly not block multiples, across shuffled blocks."""
    _check(interpreted, CTX, 8, 2, 16, 4, splits, "cpu", torch.float32, 1e-4)


def test_decode_half_precision_one_head_per_group_cpu(interpreted: ModuleType) -> None:
    """fp16 (the interpreter's bf16 tl.dot is broken; the GPU cases run bf16), group size 1."""
    _check(interpreted, [1, 9, 70, 200], 4, 4, 32, 16, 2, "cpu", torch.float16, 2e-3)


@pytest.mark.parametrize("ctx", [1, 3, 64, 65, 129, 300])
def test_single_sequence_split_counts_agree_cpu(interpreted: ModuleType, ctx: int) -> None:
    """Batch 1, where splitting matters most: more splits than 64-token chunks (empty splits
    write neutral partials), the new token alone in its chunk (65, 129), or in the first."""
    for splits in (1, 2, 5):
        _check(interpreted, [ctx], 8, 2, 16, 4, splits, "cpu", torch.float32, 1e-4)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on [B, heads, D] with cos/sin [B, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.parametrize("splits", [1, 3])
def test_rope_in_kernel_equals_rotating_first_cpu(interpreted: ModuleType, splits: int) -> None:
    """`rope`: q and the new k rotated in the kernel at position ctx - 1 give what rotating
    them before the call gives: the same output, the same rotated k stored in the cache."""
    ctx = [1, 5, 17, 65]
    kv, _, table, wb, wo, q, k_new, v_new, ctx_t = _case(ctx, 8, 2, 16, 4, "cpu",
                                                         torch.float32)
    gen = torch.Generator().manual_seed(1)
    angle = torch.rand(80, 8, generator=gen) * 6
    table_rope = torch.stack([torch.cat([angle.cos()] * 2, -1),
                              torch.cat([angle.sin()] * 2, -1)], dim=1)      # [80, 2, 16]
    cos, sin = table_rope[ctx_t.long() - 1].unbind(1)
    want_kv = kv.clone()
    want = interpreted.paged_decode(_rotate(q, cos, sin), _rotate(k_new, cos, sin), v_new,
                                    want_kv[0, 0], want_kv[0, 1], wb, wo, table, ctx_t,
                                    16 ** -0.5, splits=splits)
    got = interpreted.paged_decode(q, k_new, v_new, kv[0, 0], kv[0, 1], wb, wo, table, ctx_t,
                                   16 ** -0.5, splits=splits, rope=table_rope)
    torch.testing.assert_close(kv, want_kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unrotated = interpreted.paged_decode(q, k_new, v_new, kv[0, 0].clone(), kv[0, 1].clone(),
                                         wb, wo, table, ctx_t, 16 ** -0.5, splits=splits)
    assert (unrotated - want).abs().max() > 1e-2


def test_num_splits() -> None:
    from dynabatch.worker_svc.engine.triton_decode import num_splits

    assert num_splits(1, 8, 4096, 132) == 32            # 8 programs: split up to the cap
    assert num_splits(8, 8, 4096, 132) == 5             # 64 programs -> >= 264
    assert num_splits(64, 8, 4096, 132) == 1            # grid already full: single pass
    assert num_splits(1, 8, 100, 132) == 2              # at most one split per 64-token tile
    assert num_splits(1, 8, 1, 132) == 1


@pytest.mark.parametrize("splits", [None, 1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads,dim,block", [(32, 8, 64, 16), (16, 2, 128, 16),
                                                      (8, 8, 64, 32)])
@pytest.mark.parametrize("batch", [1, 9])
@needs_cuda
def test_decode_matches_reference_gpu(heads: int, kv_heads: int, dim: int, block: int,
                                      batch: int, splits: int | None) -> None:
    """The compiled kernels; batch 1 is where the automatic choice splits the most."""
    from dynabatch.worker_svc.engine import triton_decode

    ctx = [1, 7, 16, 17, 100, 255, 256, 513, 1000] if batch > 1 else [700]
    _check(triton_decode, ctx, heads, kv_heads, dim, block, splits, "cuda", torch.bfloat16,
           2e-2)


@pytest.mark.parametrize("batch", [1, 4])
@needs_cuda
def test_split_decode_replays_in_cuda_graph(batch: int) -> None:
    """Automatic splits (> 1 at these batches) captured once, replayed with other context
    lengths: the chunking follows the live lengths read on device."""
    from dynabatch.worker_svc.engine.triton_decode import num_splits, paged_decode

    heads, kv_heads, dim, block, width = 32, 8, 64, 16, 64
    dev, bf16 = "cuda", torch.bfloat16
    kv = torch.randn(1, 2, 1 + batch * width, kv_heads, block, dim, device=dev, dtype=bf16)
    table = torch.arange(1, 1 + batch * width, device=dev, dtype=torch.int32).view(batch, width)
    q = torch.randn(batch, heads, dim, device=dev, dtype=bf16)
    k_new, v_new = (torch.randn(batch, kv_heads, dim, device=dev, dtype=bf16) for _ in "kv")
    ctx_t = torch.ones(batch, dtype=torch.int32, device=dev)
    wb = torch.zeros(batch, dtype=torch.long, device=dev)
    wo = torch.zeros(batch, dtype=torch.long, device=dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert num_splits(batch, kv_heads, width * block, sms) > 1
    args = (q, k_new, v_new, kv[0, 0], kv[0, 1], wb, wo, table, ctx_t, dim ** -0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        paged_decode(*args)                       # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode(*args)
    for lens in ([1] * batch, [300 + 97 * i for i in range(batch)],
                 [1024 - i for i in range(batch)]):
        ctx_t.copy_(torch.tensor(lens, dtype=torch.int32))
        pos = ctx_t.long() - 1
        wb.copy_(table.gather(1, (pos // block)[:, None])[:, 0].long())
        wo.copy_(pos % block)
        kv[0, 0][wb, :, wo] = 0
        graph.replay()
        torch.testing.assert_close(kv[0, 0][wb, :, wo], k_new)
        want = paged_decode(*args, splits=1)       # the single-pass kernel, eager
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
