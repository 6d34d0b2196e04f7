"""Prefill steps padded to bucketed token counts (the CUDA graphs' inputs, prefill_graphs.py),
run without capture on CPU with the Triton paged kernel in its interpreter: greedy output
still equals model.generate for mixed-length requests, continued chunks (small token budget),
admissions mid-decode and preemption by recompute; every padded step touches only its own
slots and the scratch block (blocks all free at the end, checked by drain)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dynabatch.worker_svc.engine import SequenceRequest

from engine.conftest import interpreted_module
from engine.test_engine import (drain, engine_for, greedy_reference, random_prompts, ref_llama,  # noqa: F401
                               tokens)

pytest.importorskip("triton")


def padded_engine(path: Path, **kw):
    interpreted_module("triton_prefill")
    from dynabatch.worker_svc.engine.prefill_graphs import PrefillGraphs

    engine = engine_for(path, **kw)
    runner = engine.runner
    runner.prefill_graphs = PrefillGraphs(runner._prefill_forward, runner.inputs,
                                          engine.model.config.num_attention_heads,
                                          engine.scheduler.max_running,
                                          engine.scheduler.token_budget, graphs=False)
    return engine


def _ran_padded(engine, monkeypatch) -> list[int]:
    """Records the bucket of every padded prefill step."""
    graphs = engine.runner.prefill_graphs
    seen: list[int] = []
    step = graphs._step
    monkeypatch.setattr(graphs, "_step", lambda b: (seen.append(b), step(b))[1])
    return seen


def test_padded_prefill_matches_generate(llama_path: Path, ref_llama, monkeypatch) -> None:
    prompts = random_prompts(5, 6, 1, 70)
    reqs = [SequenceRequest(f"g{i}", p, 6 + 2 * i, ignore_eos=True)
            for i, p in enumerate(prompts)]
    engine = padded_engine(llama_path, prefill_token_budget=48)
    buckets = _ran_padded(engine, monkeypatch)
    outs = drain(engine, {0: reqs[:3], 5: reqs[3:]})
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids,
                                                              r.max_tokens)
    assert buckets and set(buckets) <= {16, 32, 48}
    assert any(b < 48 for b in buckets)          # padded, not only full-budget steps


def test_padded_prefill_after_preemption(llama_path: Path, ref_llama) -> None:
    prompts = random_prompts(6, 4, 20, 40)
    reqs = [SequenceRequest(f"h{i}", p, 30, ignore_eos=True) for i, p in enumerate(prompts)]
    engine = padded_engine(llama_path, num_kv_blocks=8, prefill_token_budget=64)
    outs = drain(engine, {0: reqs})
    assert engine.stats().preemptions > 0
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids, 30)


def test_padded_mixed_steps_split_long_contexts(llama_path: Path, ref_llama, monkeypatch) -> None:
    """Mixed steps (decode rows riding along chunks) whose tiles are cut into pieces of
    context (pieces of 64 tokens here, triton_prefill.plan) still decode as model.generate."""
    tp = interpreted_module("triton_prefill")
    monkeypatch.setattr(tp, "MIN_PIECE", tp.BLOCK_N)
    split_tiles: list[int] = []
    plan = tp.plan

    def recorded(*args):
        items, merges = plan(*args)
        split_tiles.append(int((merges[0] >= 0).sum()))
        return items, merges

    monkeypatch.setattr(tp, "plan", recorded)
    prompts = random_prompts(4, 7, 70, 140)
    reqs = [SequenceRequest(f"s{i}", p, 5 + i, ignore_eos=True) for i, p in enumerate(prompts)]
    engine = padded_engine(llama_path, prefill_token_budget=32, mixed_steps=True)
    outs = drain(engine, {0: reqs[:2], 4: reqs[2:]})
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids,
                                                              r.max_tokens)
    assert max(split_tiles) >= 2
