"""The compiled decode forward's rotary table gives the rotary module's own cos/sin."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dynabatch.worker_svc.engine.compiled import rope_table


def test_rope_table_equals_the_rotary_module(llama_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16)
    base = model.base_model
    table = rope_table(model, 300)
    pos = torch.tensor([[0, 1, 17, 255, 299, 5]])
    hidden = torch.zeros(1, pos.shape[1], model.config.hidden_size, dtype=torch.bfloat16)
    cos, sin = base.rotary_emb(hidden, position_ids=pos)
    got_cos, got_sin = table[pos[0]][None].unbind(2)
    assert table.shape == (300, 2, cos.shape[-1]) and table.dtype == cos.dtype
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)


def test_compiled_decode_matches_eager_with_one_graph_for_all_layers() -> None:
    """On CPU (inductor's C++ backend): the compiled decode forward gives the eager engine's
    greedy tokens, and every layer and batch size reuses one layer graph (no recompiles)."""
    from torch._dynamo.utils import counters

    from dynabatch.worker_svc.engine import SequenceRequest, build_engine

    prompts = [[(7 * i + j) % 256 for j in range(5 + 13 * i)] for i in range(5)]
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        engine = build_engine("tiny-random-llama", device="cpu", dtype=torch.float32,
                              num_kv_blocks=64, max_running=8, cuda_graphs=False,
                              compile_decode=compiled)
        for i, p in enumerate(prompts):
            engine.add(SequenceRequest(f"r{i}", p, 12, ignore_eos=True))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        results.append(out)
    assert results[0] == results[1]
    assert counters["stats"]["unique_graphs"] == 2          # the layer and the final norm
    assert not counters["recompiles"]


@pytest.mark.parametrize("model", ["tiny-random-llama", "tiny-random-qwen3"])
def test_compiled_prefill_matches_eager_without_recompiles(model: str) -> None:
    """On CPU: the lean prefill compiled in pieces gives the eager engine's greedy tokens, with
    prompts split into chunks over several steps (a small token budget, so chunks continue a
    cached context) and a pool small enough to preempt; after the start-up warm-up no step
    compiles again, whatever its token count. Qwen3: the q/k norms' branch."""
    from torch._dynamo.utils import counters

    from dynabatch.worker_svc.engine import SequenceRequest, build_engine

    prompts = [[(11 * i + 3 * j) % 256 for j in range(1 + 9 * i)] for i in range(5)]
    results = []
    torch._dynamo.reset()
    for compiled in (False, True):
        engine = build_engine(model, device="cpu", dtype=torch.float32,
                              num_kv_blocks=9, max_running=4, prefill_token_budget=20,
                              cuda_graphs=False, compile_decode=False, compile_prefill=compiled)
        counters.clear()
        for i, p in enumerate(prompts):
            engine.add(SequenceRequest(f"r{i}", p, 40, ignore_eos=True))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        assert engine.stats().kv_blocks_used == 0
        assert engine.stats().preemptions > 0
        assert not counters["stats"]["unique_graphs"] and not counters["recompiles"]
        results.append(out)
    assert results[0] == results[1]
    assert all(len(t) == 40 for t in results[1].values())
