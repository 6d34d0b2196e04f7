"""End-to-end engine behaviour on tiny random checkpoints (CPU, fp32)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dynabatch.worker_svc.engine import Sampling, SequenceRequest, TokenOutput, build_engine
from transformers import AutoModelForCausalLM


def reference_model(path: Path) -> torch.nn.Module:
    """The same checkpoint on transformers' own SDPA attention, for model.generate."""
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def engine_for(path: Path, **kw):
    kw.setdefault("num_kv_blocks", 64)
    return build_engine(str(path), device="cpu", **kw)


def drain(engine, add_at: dict[int, list[SequenceRequest]] | None = None,
          max_steps: int = 2000) -> dict[str, list[TokenOutput]]:
    """Step until idle, adding requests at given step numbers; checks offsets and leaks."""
    add_at = dict(add_at or {})
    outs: dict[str, list[TokenOutput]] = {}
    step = 0
    while engine.has_work() or add_at:
        for req in add_at.pop(step, []):
            engine.add(req)
        for o in engine.step():
            prev = outs.setdefault(o.request_id, [])
            expect = prev[-1].offset + len(prev[-1].token_ids) if prev else o.offset
            assert o.offset == expect
            assert not (prev and prev[-1].finish_reason), "output after finish"
            prev.append(o)
        step += 1
        assert step < max_steps
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0
    return outs


def tokens(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def greedy_reference(ref, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def random_prompts(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def ref_llama(llama_path: Path):
    ref = reference_model(llama_path)
    ref.generation_config.eos_token_id = None   # our requests use ignore_eos
    return ref


@pytest.mark.parametrize("mixed", [False, True], ids=["alternating", "mixed"])
def test_greedy_matches_generate_with_mid_decode_admission(llama_path: Path, ref_llama,
                                                           mixed: bool) -> None:
    prompts = random_prompts(0, 7, 1, 70)
    max_toks = [5 + 3 * i for i in range(len(prompts))]
    reqs = [SequenceRequest(f"r{i}", p, m, ignore_eos=True)
            for i, (p, m) in enumerate(zip(prompts, max_toks))]
    engine = engine_for(llama_path, prefill_token_budget=32, mixed_steps=mixed)
    outs = drain(engine, {0: reqs[:3], 4: reqs[3:5], 9: reqs[5:]})
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids,
                                                              r.max_tokens)
        assert outs[r.request_id][-1].finish_reason == "length"
    assert engine.stats().decode_batch_size > 1


@pytest.mark.parametrize("mixed", [False, True], ids=["alternating", "mixed"])
def test_preemption_by_recompute_keeps_greedy_output(llama_path: Path, ref_llama,
                                                     mixed: bool) -> None:
    prompts = random_prompts(1, 5, 20, 40)
    reqs = [SequenceRequest(f"p{i}", p, 40, ignore_eos=True, priority=i % 2)
            for i, p in enumerate(prompts)]
    engine = engine_for(llama_path, num_kv_blocks=9, prefill_token_budget=64, mixed_steps=mixed)
    outs = drain(engine, {0: reqs})
    assert engine.stats().preemptions > 0
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref_llama, r.prompt_token_ids, 40)


def test_mixed_steps_carry_decodes_under_the_step_cap(llama_path: Path, ref_llama) -> None:
    """A long prompt arriving mid-decode is prefilled in chunks of the cap set at run time, each
    in a step that also decodes the running request: it never waits a step without a token."""
    short, long_ = random_prompts(3, 2, 8, 8)[0], random_prompts(4, 1, 90, 90)[0]
    reqs = [SequenceRequest("short", short, 20, ignore_eos=True),
            SequenceRequest("long", long_, 4, ignore_eos=True)]
    engine = engine_for(llama_path, prefill_token_budget=64, mixed_steps=True)
    engine.set_step_prefill_tokens(16)
    assert engine.stats().step_prefill_tokens == 16
    engine.add(reqs[0])
    for _ in range(3):
        engine.step()
    engine.add(reqs[1])
    steps = []
    outs: dict[str, list[int]] = {"short": [], "long": []}
    while engine.has_work():
        emitted = engine.step()
        for o in emitted:
            outs[o.request_id] += o.token_ids
        steps.append(engine.last_step)
    mixed = [s for s in steps if s.kind == "prefill"]
    assert len(mixed) >= 90 // 16 and all(s.tokens <= 16 + 1 for s in mixed)
    assert any(s.tokens == 17 for s in mixed)          # a 16-token chunk + the short's decode
    assert outs["long"] == greedy_reference(ref_llama, long_, 4)
    engine.set_step_prefill_tokens(0)                  # back to the configured maximum
    assert engine.stats().step_prefill_tokens == 64
    engine.set_step_prefill_tokens(10_000)             # never above it
    assert engine.stats().step_prefill_tokens == 64
    alternating = engine_for(llama_path, prefill_token_budget=64)
    alternating.set_step_prefill_tokens(16)            # takes no cap: reports none
    assert alternating.stats().step_prefill_tokens == 0
    assert alternating.scheduler.token_budget == 64


def test_prefill_rate_counts_runs_of_small_chunks(llama_path: Path) -> None:
    """A 600-token prompt in 100-token chunks: no step alone reaches the 256 prompt tokens a
    rate is measured on, the run of them does (on CUDA the early chunks' steps do not wait for
    the GPU, so only the run's total time is the GPU's)."""
    engine = engine_for(llama_path, prefill_token_budget=100)
    engine.add(SequenceRequest("a", random_prompts(5, 1, 600, 600)[0], 2, ignore_eos=True))
    drain(engine)
    assert engine.stats().prefill_tokens_per_s > 0


def test_qwen3_greedy_matches_generate(qwen3_path: Path) -> None:
    ref = reference_model(qwen3_path)
    ref.generation_config.eos_token_id = None
    prompts = random_prompts(2, 3, 3, 30)
    reqs = [SequenceRequest(f"q{i}", p, 12, ignore_eos=True) for i, p in enumerate(prompts)]
    outs = drain(engine_for(qwen3_path, prefill_token_budget=16), {0: reqs})
    for r in reqs:
        assert tokens(outs[r.request_id]) == greedy_reference(ref, r.prompt_token_ids, 12)


def test_stop_token_ends_request_and_is_emitted(llama_path: Path) -> None:
    prompt = random_prompts(3, 1, 10, 10)[0]
    engine = engine_for(llama_path)
    full = tokens(drain(engine, {0: [SequenceRequest("a", prompt, 20, ignore_eos=True)]})["a"])
    stop = full[5]
    cut = full.index(stop)
    outs = drain(engine, {0: [SequenceRequest("b", prompt, 20, stop_token_ids=(stop,),
                                              ignore_eos=True)]})["b"]
    assert tokens(outs) == full[: cut + 1]
    assert outs[-1].finish_reason == "stop"


def test_stop_mid_batch_while_the_next_step_is_in_flight(llama_path: Path, ref_llama) -> None:
    """Decode steps overlap, so a request that stops on a token has already been launched into
    the next step: that step's token for it must be dropped, its blocks freed, and the other
    requests' tokens stay exactly greedy (they read their previous tokens on the device)."""
    prompts = random_prompts(7, 4, 5, 30)
    full = [greedy_reference(ref_llama, p, 16) for p in prompts]
    stop = full[1][4]
    cut = full[1].index(stop)
    reqs = [SequenceRequest(f"s{i}", p, 16, ignore_eos=True,
                            stop_token_ids=(stop,) if i == 1 else ())
            for i, p in enumerate(prompts)]
    engine = engine_for(llama_path, num_kv_blocks=10, prefill_token_budget=64)
    outs = drain(engine, {0: reqs[:2], 3: reqs[2:]})
    assert tokens(outs["s1"]) == full[1][: cut + 1]
    assert outs["s1"][-1].finish_reason == "stop"
    for i in (0, 2, 3):
        assert tokens(outs[f"s{i}"]) == full[i]


def test_abort_frees_blocks(llama_path: Path) -> None:
    engine = engine_for(llama_path)
    engine.add(SequenceRequest("x", list(range(50)), 100, ignore_eos=True))
    engine.add(SequenceRequest("y", list(range(20)), 100, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    assert engine.abort("x") and engine.abort("y")
    assert not engine.abort("x") and not engine.abort("nope")
    assert not engine.has_work()
    assert engine.stats().kv_blocks_used == 0


def test_resume_continues_after_earlier_output(llama_path: Path) -> None:
    prompt = random_prompts(4, 1, 15, 15)[0]
    engine = engine_for(llama_path)
    full = tokens(drain(engine, {0: [SequenceRequest("a", prompt, 20, ignore_eos=True)]})["a"])
    outs = drain(engine, {0: [SequenceRequest("b", prompt, 20, ignore_eos=True,
                                              resume_token_ids=full[:8])]})["b"]
    assert outs[0].offset == 8
    assert tokens(outs) == full[8:]
    done = drain(engine, {0: [SequenceRequest("c", prompt, 8, resume_token_ids=full[:8])]})["c"]
    assert [(o.token_ids, o.finish_reason) for o in done] == [([], "length")]


def test_seeded_sampling_is_reproducible_under_any_batching(llama_path: Path) -> None:
    s = Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=7)
    prompt = random_prompts(5, 1, 12, 12)[0]
    alone = drain(engine_for(llama_path), {0: [SequenceRequest("s", prompt, 25, s,
                                                               ignore_eos=True)]})
    others = [SequenceRequest(f"o{i}", p, 30, Sampling(temperature=1.0), ignore_eos=True)
              for i, p in enumerate(random_prompts(6, 4, 5, 40))]
    crowded = drain(engine_for(llama_path, num_kv_blocks=8, prefill_token_budget=16),
                    {0: others[:2], 3: [SequenceRequest("s", prompt, 25, s, ignore_eos=True)],
                     5: others[2:]})
    assert tokens(alone["s"]) == tokens(crowded["s"])
    other_seed = drain(engine_for(llama_path), {0: [SequenceRequest(
        "s", prompt, 25, Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=8),
        ignore_eos=True)]})
    assert tokens(other_seed["s"]) != tokens(alone["s"])


def test_top_k_one_is_greedy(llama_path: Path, ref_llama) -> None:
    prompt = random_prompts(7, 1, 9, 9)[0]
    outs = drain(engine_for(llama_path), {0: [SequenceRequest(
        "k", prompt, 15, Sampling(temperature=1.5, top_k=1), ignore_eos=True)]})
    assert tokens(outs["k"]) == greedy_reference(ref_llama, prompt, 15)


def test_rejects_prompts_longer_than_the_pool(llama_path: Path) -> None:
    engine = engine_for(llama_path, num_kv_blocks=2)
    with pytest.raises(ValueError):
        engine.add(SequenceRequest("big", list(range(40)), 4))


def test_lowest_priority_is_preempted_first(llama_path: Path, ref_llama) -> None:
    low, high = random_prompts(8, 2, 30, 30)
    engine = engine_for(llama_path, num_kv_blocks=6)
    finished: list[str] = []
    add_at = {0: [SequenceRequest("low", low, 40, ignore_eos=True, priority=0)],
              2: [SequenceRequest("high", high, 40, ignore_eos=True, priority=1)]}
    outs: dict[str, list[int]] = {}
    step = 0
    while engine.has_work() or add_at:
        for req in add_at.pop(step, []):
            engine.add(req)
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason:
                finished.append(o.request_id)
        step += 1
    assert engine.stats().preemptions > 0
    assert finished == ["high", "low"]
    assert engine.stats().kv_blocks_used == 0
    assert outs["low"] == greedy_reference(ref_llama, low, 40)
    assert outs["high"] == greedy_reference(ref_llama, high, 40)


def test_the_worker_flag_sets_the_step_prefill_budget(llama_path: Path) -> None:
    """`dynabatch worker --step-prefill-tokens N` is the engine's fixed step budget (the fixed
    baseline of the step cap), and the CLI refuses a budget below one token."""
    from dynabatch.cli import build_parser, engine_options
    args = build_parser().parse_args(["worker", "--device", "cpu", "--kv-blocks", "64",
                                      "--mixed-steps", "--step-prefill-tokens", "24"])
    engine = build_engine(str(llama_path), **engine_options(args))
    assert engine.stats().step_prefill_tokens == 24
    engine.set_step_prefill_tokens(10_000)             # a policy's cap never lifts it
    assert engine.stats().step_prefill_tokens == 24
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--step-prefill-tokens", "0"])
