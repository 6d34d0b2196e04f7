"""Weight-streaming GEMM for the decode step: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 64.

Why: at decode batch 1..16 a linear layer is a pure weight read (M x K activations against
N x K weights), so its floor is weight bytes / HBM bandwidth. cuBLAS on an H200 (~4.25 TB/s
copy bandwidth) at batch 1, Llama-3.2-1B bf16 shapes (K, N): qkv (2048, 3072) 5.04 us
(2.5 TB/s), o (2048, 2048) 5.05 us (1.66 TB/s), gate_up (2048, 16384) 17.7 us (3.8 TB/s),
down (8192, 2048) 10.4 us plus a 1.7-us split-K reduce kernel (3.2 TB/s). The small ones are
far from bandwidth: too few thread blocks in flight, and a second kernel for down.

Design: each program owns BLOCK_N output columns (BLOCK_N rows of W, contiguous along K) and
streams them in BLOCK_K tiles, 16-byte vector loads, through a loop that Triton software-
pipelines (tl.range num_stages: cp.async into shared memory, also for loads that feed no dot).
Small BLOCK_N gives hundreds of programs, so every SM keeps several tiles in flight.
- M <= 4 ("fma" path): fp32 products accumulate elementwise in one [BLOCK_N, BLOCK_K]
  register tile per row of x (rows unrolled; a 3-D tile gets a scalar-per-thread layout)
  and are reduced over K once, after the loop (no shuffles inside it).
- M > 4 ("dot" path): x is padded to 16 rows (or the next power of 2) and tl.dot (tensor cores) does the reduction;
  BLOCK_N >= 16 then, so the narrow shapes need split-K to fill the GPU.
- Split-K stays one kernel: SPLIT programs per column block each write an fp32 partial, take
  a ticket from a per-block counter (acq_rel atomic); the last to arrive sums the partials in
  split order (deterministic), adds the bias, stores y and resets the counter to 0 for the
  next call. The counters are one persistent zeroed int32 buffer per device, made on first
  use outside graph capture (a split call first seen during capture runs unsplit instead);
  calls with SPLIT > 1 must not run concurrently on two streams (they would share counters).
Tail rows of W and x are clamped rather than masked (loads stay full vectors; only the store
is masked). The launch configuration comes from _TABLE or default_config, fixed per
(M, K, N): no autotuning, no host sync, only torch.empty allocations, so a call can be
captured in a CUDA graph. tools/micro_gemv.py times it against F.linear and sweeps configs.

Decode only: above 64 rows use F.linear (cuBLAS), which is compute-efficient there; 17-64
rows are for tools/micro_gemv.py to measure against cuBLAS (the engine uses 1-4). The engine
runs decode steps of up to 2 rows through it (lean_decode.py, with the fused norm / SiLU /
residual forms), the lm_head included: at the
1B shape (K 2048, N 128256, 525 MB, the largest weight read of a step) default_config gives it
gate_up's per-program tile (16 columns x 512 K at one row, x 256 at two) over 8,016 programs,
~60 per SM, so no table entry until tools/micro_gemv.py (shape "lm_head") says otherwise.
Weight offsets are int32: N x K row stride below 2^31 elements (a 128k vocab up to K = 16k).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_ROWS = 64
_COUNTERS = 1 << 16          # split-K tickets: one int32 per column block, per device
_REG_BUDGET = 64             # fp32 accumulator registers per thread on the fma path
_FMA_ROWS = 4                # the fma path's most rows (unrolled); more go to tl.dot
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, g_ptr, r_ptr, eps, M, N, K,
                 k_per_split, stride_xm, stride_wn, stride_ym, stride_rm,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr, NORM: tl.constexpr,
                 SILU_MUL: tl.constexpr, RESIDUAL: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, M_PAD)
    rk = tl.arange(0, BLOCK_K)
    # Clamped, not masked: tail programs re-read the last row; the store drops the copies.
    w_ptrs = w_ptr + tl.minimum(rn, N - 1)[:, None] * stride_wn + rk[None, :]
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if DOT:
        acc = _dot_tiles(x_ptr, w_ptrs, rm, rk, M, stride_xm, k_lo, k_hi, M_PAD, BLOCK_N,
                         BLOCK_K, EVEN_K, NUM_STAGES)
    else:
        acc = _fma_tiles(x_ptr, w_ptrs, g_ptr, eps, rk, M, K, stride_xm, k_lo, k_hi, M_PAD,
                         BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, NORM, SILU_MUL)
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT > 1:
        part_ptrs = part_ptr + (rm[:, None] * N + rn[None, :])
        tl.store(part_ptrs + split * M * N, acc, mask=out_mask)
        tl.debug_barrier()          # every thread's partial precedes the release below
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:     # last of this column block: reduce in split order
            acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT):
                acc += tl.load(part_ptrs + s * M * N, mask=out_mask, other=0.0,
                               cache_modifier=".cg")
            _store_out(acc, b_ptr, y_ptr, r_ptr, rm, rn, N, stride_ym, stride_rm, out_mask,
                       HAS_BIAS, RESIDUAL)
            tl.atomic_xchg(count_ptr + pid_n, 0)
    else:
        _store_out(acc, b_ptr, y_ptr, r_ptr, rm, rn, N, stride_ym, stride_rm, out_mask,
                   HAS_BIAS, RESIDUAL)


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot_tiles(x_ptr, w_ptrs, rm, rk, M, stride_xm, k_lo, k_hi, M_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               NUM_STAGES: tl.constexpr):
    """x padded to M_PAD >= 16 rows (clamped copies), tl.dot per tile: [M_PAD, BLOCK_N]."""
    x_ptrs = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        kmask = (k + rk)[None, :] < k_hi
        w = tl.trans(_load(w_ptrs + k, kmask, EVEN_K))
        x = _load(x_ptrs + k, kmask, EVEN_K)
        if x.dtype == tl.float32:       # fp32 as F.linear's, not TF32
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _rstd(x_row, eps, K, rk, BLOCK_K: tl.constexpr):
    """RMSNorm's 1 / sqrt(mean(x^2) + eps) of one row of K (read whole, from L2: every
    program of the call reads the same row), fp32."""
    ss = tl.zeros([BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        v = tl.load(x_row + k + rk, mask=(k + rk) < K, other=0.0).to(tl.float32)
        ss += v * v
    return tl.rsqrt(tl.sum(ss, 0) / K + eps)


@triton.jit
def _x_tile(x_row, g_ptr, rstd, k, rk, kmask, K, EVEN_K: tl.constexpr, NORM: tl.constexpr,
            SILU_MUL: tl.constexpr):
    """One BLOCK_K tile of a row of the GEMV's input, fp32, rounded as transformers' modules
    round it in x's dtype: RMSNorm(x) * g (NORM), or silu(gate) * up of a row [gate | up]
    of 2K (SILU_MUL), or x itself."""
    x = _load(x_row + k + rk, kmask, EVEN_K)
    if NORM:
        g = _load(g_ptr + k + rk, kmask, EVEN_K).to(tl.float32)
        x = (g * (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
    if SILU_MUL:
        up = _load(x_row + K + k + rk, kmask, EVEN_K).to(tl.float32)
        gate = x.to(tl.float32)
        x = ((gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32) * up).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _fma_tiles(x_ptr, w_ptrs, g_ptr, eps, rk, M, K, stride_xm, k_lo, k_hi, M_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               NUM_STAGES: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr):
    """M_PAD (1, 2 or 4) rows of fp32 FMAs into [BLOCK_N, BLOCK_K] tiles, one per row (the
    rows are unrolled: a 3-D [M, N, K] tile gets a scalar-per-thread layout), reduced over K
    after the loop: [M_PAD, BLOCK_N]. NORM / SILU_MUL: the input is transformed on the fly
    (_x_tile), so the norm or activation needs no kernel of its own."""
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    x0 = x_ptr
    x1 = x_ptr + tl.minimum(1, M - 1) * stride_xm
    x2 = x_ptr + tl.minimum(2, M - 1) * stride_xm
    x3 = x_ptr + tl.minimum(3, M - 1) * stride_xm
    r0 = 1.0
    r1 = 1.0
    r2 = 1.0
    r3 = 1.0
    if NORM:
        r0 = _rstd(x0, eps, K, rk, BLOCK_K)
        if M_PAD > 1:
            r1 = _rstd(x1, eps, K, rk, BLOCK_K)
        if M_PAD > 2:
            r2 = _rstd(x2, eps, K, rk, BLOCK_K)
            r3 = _rstd(x3, eps, K, rk, BLOCK_K)
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        kmask = (k + rk) < k_hi
        w = _load(w_ptrs + k, kmask[None, :], EVEN_K).to(tl.float32)
        acc0 += w * _x_tile(x0, g_ptr, r0, k, rk, kmask, K, EVEN_K, NORM, SILU_MUL)[None, :]
        if M_PAD > 1:
            acc1 += w * _x_tile(x1, g_ptr, r1, k, rk, kmask, K, EVEN_K, NORM, SILU_MUL)[None, :]
        if M_PAD > 2:
            acc2 += w * _x_tile(x2, g_ptr, r2, k, rk, kmask, K, EVEN_K, NORM, SILU_MUL)[None, :]
            acc3 += w * _x_tile(x3, g_ptr, r3, k, rk, kmask, K, EVEN_K, NORM, SILU_MUL)[None, :]
    rm = tl.arange(0, M_PAD)[:, None]
    acc = tl.where(rm == 0, tl.sum(acc0, 1)[None, :], 0.0)
    if M_PAD > 1:
        acc = tl.where(rm == 1, tl.sum(acc1, 1)[None, :], acc)
    if M_PAD > 2:
        acc = tl.where(rm == 2, tl.sum(acc2, 1)[None, :], acc)
        acc = tl.where(rm == 3, tl.sum(acc3, 1)[None, :], acc)
    return acc


@triton.jit
def _store_out(acc, b_ptr, y_ptr, r_ptr, rm, rn, N, stride_ym, stride_rm, out_mask,
               HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    if RESIDUAL:    # r + linear(x): the linear's output rounded first, as in the modules
        r = tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=out_mask, other=0.0)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=out_mask)


@dataclass(frozen=True)
class Config:
    """One launch: tile sizes, Triton settings, split-K factor, and tl.dot vs fp32 FMAs."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    split: int = 1
    dot: bool = False


# (padded M, K, N) -> Config, from tools/micro_gemv.py sweeps on an H200; default_config
# covers everything else. Padded M: 1, 2, 4, 8, 16.
_TABLE: dict[tuple[int, int, int], Config] = {}


def padded_rows(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def default_config(m: int, k: int, n: int, sm_count: int = 132) -> Config:
    """~2 programs per SM or more (hundreds at the 1B shapes), tiles as large as the register
    budget allows; split-K only on the dot path, when its >= 16-column blocks are too few."""
    m_pad = padded_rows(m)
    k_pow2 = triton.next_power_of_2(k)
    target = 2 * sm_count
    if m_pad <= _FMA_ROWS:
        block_n = max(1, min(16, _pow2_floor(n // target)))
        block_k = max(16, min(k_pow2, _REG_BUDGET * 32 * 4 // (m_pad * block_n)))
        iters = triton.cdiv(k, block_k)
        return Config(block_n, block_k, num_stages=min(2, iters))   # 3 stages cap occupancy
    block_n = 32 if n >= 32 * target else 16
    block_k = max(16, min(k_pow2, 256 if m_pad <= 16 else 128))
    blocks = triton.cdiv(n, block_n)
    split = _pow2_floor(max(1, min(4, -(-target // blocks), k // (2 * block_k))))
    return Config(block_n, block_k, num_stages=3, split=split, dot=True)


def pick_config(m: int, k: int, n: int, sm_count: int = 132) -> Config:
    return _TABLE.get((padded_rows(m), k, n)) or default_config(m, k, n, sm_count)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132       # the interpreter (CPU tests): as on an H200
    return torch.cuda.get_device_properties(device).multi_processor_count


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> Optional[torch.Tensor]:
    """The device's zeroed ticket buffer; None if it does not exist yet and a graph is being
    captured (zeroing it inside the capture would replay with the graph, in its pool)."""
    buf = _counters.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return buf


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[Config] = None, *, norm: Optional[torch.Tensor] = None,
         eps: float = 1e-6, silu_mul: bool = False,
         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= 64, weight [N, K] (K contiguous),
    bf16 or fp16 (fp32 too: the engine's CPU tests), fp32 accumulation; returns [M, N] in
    x's dtype. `config` (default: pick_config) is for tools/micro_gemv.py's sweep.

    Fused around it (at most 4 rows, the fma path), each rounded as transformers' modules
    round it in x's dtype: `norm` [K]: the input is RMSNorm(x, eps) * norm; `silu_mul`: x is
    [M, 2K], gate then up, and the input is silu(gate) * up; `residual` [M, N]: returns
    residual + the linear's output."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes 2-D x with at most {MAX_ROWS} rows, got {tuple(x.shape)}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"gemv takes bf16/fp16/fp32 x and weight of one dtype, got {x.dtype}, "
                         f"{weight.dtype}")
    m, k = x.shape[0], x.shape[1] // 2 if silu_mul else x.shape[1]
    n = weight.shape[0]
    if silu_mul and x.shape[1] != 2 * k:
        raise ValueError(f"silu_mul takes x of an even width [M, 2K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with K contiguous, got {tuple(weight.shape)}"
                         f" strides {weight.stride()}")
    if weight.stride(0) * n >= 2 ** 31:
        raise ValueError(f"weight offsets must fit int32, got {tuple(weight.shape)} strides "
                         f"{weight.stride()}")
    for name, t, shape in (("bias", bias, (n,)), ("norm", norm, (k,)),
                           ("residual", residual, (m, n))):
        if t is not None and (t.shape != shape or t.dtype != x.dtype):
            raise ValueError(f"{name} must be {list(shape)} of {x.dtype}, got "
                             f"{tuple(t.shape)} of {t.dtype}")
    fused = norm is not None or silu_mul or residual is not None
    if fused and m > _FMA_ROWS:
        raise ValueError(f"norm, silu_mul and residual take at most {_FMA_ROWS} rows, got {m}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if k == 0 and not fused:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    if x.stride(1) != 1:
        x = x.contiguous()
    bias, norm, residual = (None if t is None else t if t.stride(-1) == 1 else t.contiguous()
                            for t in (bias, norm, residual))
    cfg = config or pick_config(m, k, n, _sm_count(x.device))
    if fused and cfg.dot:
        cfg = default_config(m, k, n, _sm_count(x.device))
    return _launch(x, weight, bias, y, cfg, norm, eps, silu_mul, residual)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            y: torch.Tensor, cfg: Config, norm: Optional[torch.Tensor] = None,
            eps: float = 0.0, silu_mul: bool = False,
            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    m, k = x.shape[0], weight.shape[1]
    n = weight.shape[0]
    if not cfg.dot and m > _FMA_ROWS:
        raise ValueError(f"the fma path takes at most {_FMA_ROWS} rows, got {m}")
    blocks = triton.cdiv(n, cfg.block_n)
    split = cfg.split
    counters = _split_counters(x.device) if split > 1 and blocks <= _COUNTERS else None
    if counters is None:
        split = 1
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)          # no empty splits
    if split > 1:
        part = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    else:
        part = counters = y                      # unused
    m_pad = max(16, padded_rows(m)) if cfg.dot else padded_rows(m)
    _gemv_kernel[(blocks, split)](
        x, weight, bias if bias is not None else y, y, part, counters,
        norm if norm is not None else y, residual if residual is not None else y, eps,
        m, n, k, k_per_split, x.stride(0), weight.stride(0), y.stride(0),
        residual.stride(0) if residual is not None else 0,
        M_PAD=m_pad, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split, DOT=cfg.dot,
        EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, NUM_STAGES=cfg.num_stages,
        NORM=norm is not None, SILU_MUL=silu_mul, RESIDUAL=residual is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
