"""The sampler's two-stage argmax equals torch.argmax: values, ties (lowest index), -inf, bf16."""
from __future__ import annotations

import pytest
import torch

from dynabatch.worker_svc.engine.api import Sampling
from dynabatch.worker_svc.engine.sampler import RowSampling, Sampler, argmax_rows

# 128256: Llama 3 (chunks of 256, no padding); 151936: Qwen (padded to chunks of 512); 32000;
# 8000: small enough for one stage.
VOCABS = [128256, 151936, 32000, 8000]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_argmax(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    x = (torch.randn(5, vocab, generator=gen) * 4).to(dtype)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_lowest_index(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    # Few distinct values: the maximum repeats within chunks and across them.
    x = torch.randint(0, 4, (4, vocab), generator=gen).to(dtype)
    x[1] = 0.0
    x[1, [vocab - 1, 700, 300, 2 * 256, 256]] = 5.0         # chunk starts and the last index
    x[2] = -1.0
    x[2, vocab - 1] = 0.0                                   # the max is the very last index
    got = argmax_rows(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[1] == 256 and got[2] == vocab - 1
    assert all(x[0, : got[0]].lt(x[0, got[0]]).tolist())


@pytest.mark.parametrize("vocab", VOCABS)
def test_negative_infinity(vocab: int) -> None:
    x = torch.full((4, vocab), float("-inf"), dtype=torch.bfloat16)
    x[1, vocab - 1] = -1e4                                  # one finite logit, last index
    x[2, 3 * vocab // 4:] = -3.0                            # a run of equal finite logits
    x[3] = torch.randn(vocab).bfloat16()
    x[3, ::2] = float("-inf")
    got = argmax_rows(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[0] == 0 and got[1] == vocab - 1 and got[2] == 3 * vocab // 4


def test_sampler_greedy_and_sampled_rows() -> None:
    """Greedy rows are argmax; a top-k 1 sampled row is its argmax too."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 128256, generator=gen)
    sampler = Sampler(torch.device("cpu"))
    assert torch.equal(sampler(logits, {}), logits.argmax(dim=-1))
    rows = {1: RowSampling(Sampling(temperature=0.7, top_k=1, seed=3), 0)}
    assert torch.equal(sampler(logits, rows), logits.argmax(dim=-1))


@pytest.fixture(scope="module")
def triton_argmax():
    """triton_argmax.argmax_rows: on CUDA, or in Triton's interpreter on CPU tensors."""
    pytest.importorskip("triton")
    import triton.language.standard as std

    if not torch.cuda.is_available() and type(std.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    from dynabatch.worker_svc.engine.triton_argmax import argmax_rows as fast
    return fast


@pytest.mark.parametrize("vocab", [128256, 151936, 12000])
def test_triton_argmax_matches_torch(triton_argmax, vocab: int) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(vocab)
    x = (torch.randn(6, vocab, generator=gen) * 4).bfloat16()
    x[1] = torch.randint(0, 3, (vocab,), generator=gen).bfloat16()    # ties within and across
    x[2] = float("-inf")                                                # all -inf: index 0
    x[3] = -1.0
    x[3, vocab - 1] = 0.0                                               # the last index wins
    x[4] = 0.0
    x[4, [vocab - 1, 4096 * 2 + 7, 4096 + 3]] = 2.0                     # first chunk with the max
    got = triton_argmax(x.to(dev)).cpu()
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[2] == 0 and got[3] == vocab - 1 and got[4] == 4096 + 3
