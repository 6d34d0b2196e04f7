"""The Triton decode GEMM (fma and tl.dot paths, split-K in one kernel) against F.linear.

Without CUDA the kernel runs in Triton's interpreter (numpy) on CPU tensors: TRITON_INTERPRET=1
must be set before triton is first imported (conftest.py does it too; the fixture checks it
took effect). The module skips when triton is not installed; the CUDA cases carry the gpu
marker. The interpreter's bf16 tl.dot is broken, so the dot path runs fp16 here (bf16 on GPU).
"""
from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from engine.conftest import interpreted_module, needs_cuda  # noqa: E402

SHAPES = [(64, 40), (100, 37), (96, 50)]      # (K, N): K and N off the block sizes below
BF16_TOL = dict(rtol=1e-2, atol=1e-2)          # outputs ~N(0, 1), rounded to bf16
FP16_TOL = dict(rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    """triton_gemv with its kernel(s) in the interpreter (CPU tensors)."""
    return interpreted_module("triton_gemv")


def _case(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, device: str = "cpu",
          seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


def _check(mod: ModuleType, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
           config=None, tol: dict | None = None) -> None:
    got = mod.gemv(x, w, b, config=config)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == x.dtype and got.shape == want.shape
    tol = tol or (BF16_TOL if x.dtype == torch.bfloat16 else FP16_TOL)
    torch.testing.assert_close(got.float(), want, **tol)


def _configs(mod: ModuleType, m: int) -> list:
    cfg = mod.Config
    dot = [cfg(16, 32, dot=True), cfg(16, 16, num_stages=2, split=3, dot=True)]
    if m > 4:
        return dot
    return [cfg(8, 32), cfg(4, 16, num_stages=2), cfg(8, 32, split=2)] + dot


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_gemv_matches_linear_cpu(interpreted: ModuleType, m: int, k: int, n: int,
                                 bias: bool) -> None:
    """Every path at tiles that leave K and N tails: fma (bf16), tl.dot (fp16), split-K."""
    for config in _configs(interpreted, m):
        dtype = torch.float16 if config.dot else torch.bfloat16
        _check(interpreted, *_case(m, k, n, dtype, bias), config=config)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_fp32_cpu(interpreted: ModuleType, m: int) -> None:
    """fp32 (the engine's CPU tests run fp32 models): every path, as F.linear to fp32 rounding."""
    for config in _configs(interpreted, m) + [None]:
        _check(interpreted, *_case(m, 100, 37, torch.float32, True), config=config,
               tol=dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("m", [1, 2, 4, 5, 16])
def test_default_config_cpu(interpreted: ModuleType, m: int) -> None:
    """pick_config's choice (fma up to 4 rows, dot above), fp16 for the interpreter's dot."""
    _check(interpreted, *_case(m, 200, 70, torch.float16, True))


def test_strided_x_and_split_counters_reset_cpu(interpreted: ModuleType) -> None:
    """x a column slice (row stride > K) and transposed (copied); after split-K calls every
    ticket counter is back at 0, ready for the next call."""
    big = torch.randn(3, 160).to(torch.bfloat16)
    _, w, b = _case(3, 100, 37, torch.bfloat16, True)
    for x in (big[:, 30:130], big[:, :100].t().contiguous().t()):
        _check(interpreted, x, w, b, config=interpreted.Config(4, 32, split=3))
        _check(interpreted, x.half(), w.half(), b.half(),
               config=interpreted.Config(16, 32, split=2, dot=True))
    assert int(interpreted._counters[torch.device("cpu")].abs().sum()) == 0


def _rms_ref(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: fp32 statistics, cast back, scaled by the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return g * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_fused_norm_silu_residual_cpu(interpreted: ModuleType, m: int,
                                      dtype: torch.dtype) -> None:
    """norm (RMSNorm * weight before the product), silu_mul ([gate | up] -> silu(gate) * up)
    and residual (added after), against the modules' own ops in the same dtype, with split-K
    and K tails; each fusion changes the result, so a kernel that skipped one would fail."""
    # bf16: outputs up to ~8 (the residual sums), where one rounding step is 1/32
    tol = dict(rtol=2e-2, atol=6e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    k, n = 100, 37
    gen = torch.Generator().manual_seed(m)
    x = (3 * torch.randn(m, k, generator=gen)).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    g = (1 + torch.rand(k, generator=gen)).to(dtype)
    r = torch.randn(m, n, generator=gen).to(dtype)
    gu = torch.randn(m, 2 * k, generator=gen).to(dtype)
    cases = [(dict(x=x, norm=g, eps=1e-5), F.linear(_rms_ref(x, g, 1e-5), w, b)),
             (dict(x=gu, silu_mul=True), F.linear(F.silu(gu[:, :k]) * gu[:, k:], w, b)),
             (dict(x=x, residual=r), r + F.linear(x, w, b)),
             (dict(x=x, norm=g, eps=1e-5, residual=r), r + F.linear(_rms_ref(x, g, 1e-5), w, b))]
    for config in (None, interpreted.Config(8, 32), interpreted.Config(4, 16, split=3)):
        for kw, want in cases:
            got = interpreted.gemv(weight=w, bias=b, config=config, **kw)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), **tol)
    plain = interpreted.gemv(x, w, b)
    assert (interpreted.gemv(x, w, b, norm=g) - plain).abs().max() > 0.1


def test_rejects_cpu(interpreted: ModuleType) -> None:
    x, w, _ = _case(17, 32, 16, torch.bfloat16, False)
    with pytest.raises(ValueError, match="at most 64 rows"):
        interpreted.gemv(torch.zeros(65, 32, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="2-D"):
        interpreted.gemv(x[0], w)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        interpreted.gemv(x[:2].float(), w)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        interpreted.gemv(x[:2].double(), w.double())
    with pytest.raises(ValueError, match="fma path"):
        interpreted.gemv(x[:5], w, config=interpreted.Config(8, 32))
    with pytest.raises(ValueError, match="K contiguous"):
        interpreted.gemv(x[:2], torch.randn(32, 16).to(torch.bfloat16).t())
    with pytest.raises(ValueError, match="at most 4 rows"):
        interpreted.gemv(x[:5], w, residual=torch.zeros(5, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm must be"):
        interpreted.gemv(x[:2], w, norm=torch.ones(31, dtype=torch.bfloat16))


def test_default_config_shapes() -> None:
    """The 1B decode shapes (lm_head included): about 2 programs per SM (132) or more, fma up
    to 4 rows within the register budget, dot (>= 16 columns) above."""
    from dynabatch.worker_svc.engine.triton_gemv import default_config

    for k, n in [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048), (2048, 128256)]:
        for m, m_pad in [(1, 1), (2, 2), (3, 4), (4, 4), (8, 16), (16, 16)]:
            cfg = default_config(m, k, n, 132)
            assert triton.cdiv(n, cfg.block_n) * cfg.split >= 256
            assert k % (cfg.block_k * cfg.split) == 0
            if m <= 4:
                assert not cfg.dot and cfg.split == 1
                assert m_pad * cfg.block_n * cfg.block_k <= 64 * 32 * cfg.num_warps
            else:
                assert cfg.dot and cfg.block_n >= 16


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("k,n", [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048),
                                 (2048, 128256), (1000, 300)])
@needs_cuda
def test_gemv_matches_linear_gpu(m: int, k: int, n: int) -> None:
    """The compiled kernel at the 1B shapes (lm_head included, and an odd one), default
    configs, bf16; fp32 (tl.dot in IEEE fp32 above 4 rows) on the odd one."""
    from dynabatch.worker_svc.engine import triton_gemv

    for bias in (False, True):
        _check(triton_gemv, *_case(m, k, n, torch.bfloat16, bias, device="cuda"),
               tol=dict(rtol=2e-2, atol=2e-2))
    if n == 300:
        _check(triton_gemv, *_case(m, k, n, torch.float32, True, device="cuda"),
               tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("m", [1, 16])
@needs_cuda
def test_gemv_replays_in_cuda_graph(m: int) -> None:
    """Captured once (split-K at 16 rows), replayed with new x: as eager, and repeatable (the
    split counters reset themselves)."""
    from dynabatch.worker_svc.engine.triton_gemv import gemv

    x, w, b = _case(m, 8192, 2048, torch.bfloat16, True, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gemv(x, w, b)                        # compile (and make the counters) outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, w, b)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(out, gemv(x, w, b), rtol=0, atol=0)
