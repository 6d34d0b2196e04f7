"""The engine: runs the model with continuous batching over a paged KV cache (see api.py).

torch is imported only when an engine is built: the worker's serving process imports the engine
contract (api.py) without it; only the engine process (worker_svc/engine_proc.py) needs torch."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from dynabatch.worker_svc.engine.api import (Engine, EngineStats, Sampling, SequenceRequest,
                                             TokenOutput)

if TYPE_CHECKING:
    import torch

    from dynabatch.worker_svc.engine.engine import PagedEngine

__all__ = ["Engine", "EngineStats", "Sampling", "SequenceRequest", "TokenOutput", "build_engine",
           "CPU_DEFAULT_BLOCKS"]

log = logging.getLogger(__name__)

# Without a GPU there is no free memory to size the pool from: this many blocks by default.
CPU_DEFAULT_BLOCKS = 4096
# Decode steps of up to this many rows run lean_decode.py on CUDA (its GEMV: faster than cuBLAS
# at 1 row, about even at 2, slower from 4: bench/results/engine_h200.md, session 6).
DEFAULT_GEMV_ROWS = 2


def build_engine(model: str, *, device: str = "auto", dtype: torch.dtype | None = None,
                 num_kv_blocks: int | None = None, kv_fraction: float = 0.9,
                 block_size: int = 16, max_running: int = 256, prefill_token_budget: int = 8192,
                 cuda_graphs: bool = True, compile_decode: bool | None = None,
                 compile_prefill: bool | None = None, prefill_graphs: bool = True,
                 gemv_rows: int | None = None, mixed_steps: bool = False,
                 seed: int = 0) -> "PagedEngine":
    """Load `model` (named shape or from_pretrained path), size the KV pool, capture graphs.

    On CUDA without `num_kv_blocks`, the pool takes `kv_fraction` of the memory still free once
    the weights are loaded. `compile_decode` (default: on CUDA, for Llama-family layouts) runs
    the decoder layers of decode steps through torch.compile (faster steps; adds ~10 s to
    start-up on an H200). `compile_prefill` (same default) compiles the lean prefill forward
    in pieces between its attention calls (prefill.py: a few kernels per layer instead of ~25,
    for steps whose token count changes every time). `prefill_graphs` (with `cuda_graphs`, on
    CUDA) also replays prefill steps of up to 2048 tokens from graphs captured at bucketed
    token counts (prefill_graphs.py). `gemv_rows` (default: 2 on CUDA, 0 = off elsewhere,
    where Triton would run in its interpreter) runs decode steps of at most that many rows
    (0..4) through lean_decode.py (the Triton GEMV with the norms, activation and residual
    adds fused in, rotary inside the attention kernel); batch 1 then gets a decode graph of
    its own. `mixed_steps`: decodes ride along prefill steps (scheduler.py) instead of
    alternating with them. The returned engine's `startup_s` is the
    measured build time, warm-up compilation included; `startup_phases` splits it (seconds:
    load, kv_pool, engine_init, then those of ModelRunner.capture that ran).
    """
    import torch

    from dynabatch.wire import models
    from dynabatch.worker_svc.engine import compiled, kv_cache, loader
    from dynabatch.worker_svc.engine.engine import PagedEngine

    t0 = time.perf_counter()
    dev = loader.resolve_device(device)
    dt = dtype or loader.default_dtype(dev)
    net = loader.load_model(model, dev, dt, seed)
    t_load = time.perf_counter()
    if compile_decode is None:
        compile_decode = dev.type == "cuda" and compiled.supports_compiled_decode(net)
    if compile_prefill is None:
        compile_prefill = dev.type == "cuda"
    if gemv_rows is None:
        gemv_rows = DEFAULT_GEMV_ROWS if dev.type == "cuda" else 0
    config = net.config
    if num_kv_blocks is None:
        if dev.type == "cuda":
            num_kv_blocks = kv_cache.blocks_from_memory(config, block_size, dt, dev, kv_fraction)
        else:
            num_kv_blocks = CPU_DEFAULT_BLOCKS
    kv = kv_cache.KVCache(config, num_kv_blocks, block_size, dt, dev)
    t_pool = time.perf_counter()
    engine = PagedEngine(net, kv, dev, max_running=max_running,
                         prefill_token_budget=prefill_token_budget,
                         max_model_len=_full_attention_len(config, models.max_model_len(config)),
                         eos_token_ids=models.eos_token_ids(config), cuda_graphs=cuda_graphs,
                         compile_decode=compile_decode, compile_prefill=compile_prefill,
                         prefill_graphs=prefill_graphs, seed=seed, gemv_rows=gemv_rows,
                         mixed_steps=mixed_steps)
    t_init = time.perf_counter()
    phases = engine.runner.capture()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    engine.startup_s = time.perf_counter() - t0
    engine.startup_phases = {"load": t_load - t0, "kv_pool": t_pool - t_load,
                             "engine_init": t_init - t_pool, **phases}
    log.info("engine start-up %.1f s: %s", engine.startup_s,
             ", ".join(f"{k} {v:.1f} s" for k, v in engine.startup_phases.items()))
    return engine


def _full_attention_len(config, max_len: int) -> int:
    """Our attention is full causal: cap the length where a sliding window would start to cut."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return min(max_len, int(window))
    return max_len
