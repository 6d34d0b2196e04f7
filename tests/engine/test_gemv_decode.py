"""Decode steps of few rows through lean_decode.LeanDecode, on CPU with the Triton kernels in
Triton's interpreter (fp32): greedy output still equals model.generate; every linear layer of a
decode step of at most `gemv_rows` rows calls the Triton GEMV (q/k/v and the input norm, o and
the residual, gate/up and the second norm, down with the activation and residual, the lm_head
and the final norm), none of a larger step or of a prefill does; compiled, the padded buckets'
steps (the CUDA graphs' inputs, run without capture) take the side of the row check their
bucket was warmed up with, and nothing compiles after the warm-up."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from dynabatch.worker_svc.engine import SequenceRequest

from engine.conftest import interpreted_module
from engine.test_engine import (drain, engine_for, greedy_reference,  # noqa: F401
                               random_prompts, ref_llama, tokens)

pytest.importorskip("triton")

# tiny-random-llama's linear layers, by output width: per layer q/k/v 128, o 64, gate/up 256,
# down 64 (2 layers), lm_head 260 (tied to the embedding).
_PER_STEP = Counter({128: 2, 64: 4, 256: 2, 260: 1})


@pytest.fixture
def gemv_calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, N) of every dynabatch::gemv call. Tiles sized for a 4-SM GPU: far fewer
    programs for the interpreter to run than the H200 default's one column each."""
    mod = interpreted_module("triton_gemv")
    calls: list[tuple[int, int]] = []
    real = mod.gemv

    def counting(x, weight, bias=None, config=None, **fused):
        calls.append((x.shape[0], weight.shape[0]))
        return real(x, weight, bias, config, **fused)

    monkeypatch.setattr(mod, "gemv", counting)
    monkeypatch.setattr(mod, "_sm_count", lambda device: 4)
    return calls


def _check_calls(calls: list[tuple[int, int]], rows: dict[int, int]) -> None:
    """`rows`: how many decode steps of each row count went through the GEMV (all of their
    linear layers, once each)."""
    steps = sum(rows.values())
    assert Counter(m for m, _ in calls) == Counter({m: n * _PER_STEP.total()
                                                    for m, n in rows.items()})
    assert Counter(n for _, n in calls) == Counter({n: k * steps for n, k in _PER_STEP.items()})


@pytest.mark.parametrize("batch,gemv_rows", [(1, 2), (2, 2), (3, 2), (1, None)])
def test_gemv_decode_matches_generate(llama_path: Path, ref_llama, gemv_calls, batch: int,
                                      gemv_rows: int | None) -> None:
    """Eager decode steps of `batch` rows (5 each); None: the CPU default, off."""
    new = 6
    reqs = [SequenceRequest(f"g{i}", p, new, ignore_eos=True)
            for i, p in enumerate(random_prompts(8 + batch, batch, 3, 20))]
    engine = engine_for(llama_path, gemv_rows=gemv_rows)
    assert engine.runner.gemv_rows == (gemv_rows or 0)
    outs = drain(engine, {0: reqs})
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids, new)
    _check_calls(gemv_calls, {batch: new - 1} if batch <= (gemv_rows or 0) else {})


def test_compiled_bucket_graphs_call_gemv_up_to_the_threshold(llama_path: Path, ref_llama,
                                                              gemv_calls) -> None:
    """Buckets 1, 2, 3 (batch 1 gets its own with the lean decode); requests ending one after
    another decode at 3, 2, then 1 rows: the GEMV at 2 and 1 only; 2 graphs compiled at
    warm-up (the layer and the final norm, for 3 rows: the lean decode compiles nothing), none
    after."""
    from torch._dynamo.utils import counters

    from dynabatch.worker_svc.engine.graphs import DecodeGraphs

    torch._dynamo.reset()
    counters.clear()
    engine = engine_for(llama_path, max_running=3, compile_decode=True, gemv_rows=2)
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner._decode_forward, runner.inputs, 3,
                                 min_batch=runner.min_decode_batch, graphs=False)
    assert runner.graphs.buckets == [1, 2, 3]
    runner.graphs.capture()
    assert counters["stats"]["unique_graphs"] == 2
    assert {m for m, _ in gemv_calls} == {1, 2}
    counters.clear()
    gemv_calls.clear()
    reqs = [SequenceRequest(f"c{i}", p, 3 + 3 * i, ignore_eos=True)
            for i, p in enumerate(random_prompts(12, 3, 3, 20))]
    outs = drain(engine, {0: reqs})
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids,
                                                              r.max_tokens)
    assert not counters["stats"]["unique_graphs"] and not counters["recompiles"]
    _check_calls(gemv_calls, {2: 3, 1: 3})


def test_gemv_rows_out_of_range_is_refused(llama_path: Path) -> None:
    """The fused GEMV forms take at most 4 rows: a larger threshold is a clear error."""
    with pytest.raises(ValueError, match="gemv_rows must be in 0..4"):
        engine_for(llama_path, gemv_rows=5)
