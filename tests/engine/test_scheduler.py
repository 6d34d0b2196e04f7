"""The engine's step scheduler on a bare block pool (no model): admission against free KV."""
from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from dynabatch.worker_svc.engine.api import SequenceRequest
from dynabatch.worker_svc.engine.kv_cache import BlockAllocator
from dynabatch.worker_svc.engine.scheduler import Scheduler
from dynabatch.worker_svc.engine.sequence import Sequence


def seq(rid: str, prompt: int, arrival: int) -> Sequence:
    return Sequence(SequenceRequest(rid, [1] * prompt, max_tokens=8), arrival, eos_ids=())


def test_the_step_cap_binds_only_steps_that_carry_decodes():
    """The cap keeps a decoding sequence's time between tokens short; a step with no decode
    delays no token, so it prefills up to the configured budget (fewer steps to first token)."""
    sched = Scheduler(SimpleNamespace(allocator=BlockAllocator(64), block_size=4),
                      max_running=8, token_budget=64, mixed=True)
    sched.set_step_cap(16)                  # the cap the policy sent
    a, b = seq("a", 40, 0), seq("b", 90, 1)
    sched.add(a)
    assert [(c.start, c.end) for c in sched.schedule()] == [(0, 40)]
    a.num_computed = len(a.tokens)          # a decodes from now on
    a.tokens.append(7)
    sched.add(b)
    step = sched.schedule()
    assert [(c.seq, c.start, c.end, c.decode) for c in step] == [(a, 40, 41, True),
                                                                (b, 0, 16, False)]
    b.num_computed = 16                     # the step ran; a finishes
    sched.drop(a)
    assert [(c.start, c.end) for c in sched.schedule()] == [(16, 80)]


def test_a_prompt_is_admitted_whole_or_not_at_all():
    """10 blocks of 4 tokens; `a` takes 6. `b` needs 4 and only 4 - 1 (a reserve block for the
    running `a`) are spare: admitted on a partial chunk it would hold blocks it cannot fill, so
    it waits, and gets in whole once `a` has left."""
    sched = Scheduler(SimpleNamespace(allocator=BlockAllocator(10), block_size=4),
                      max_running=8, token_budget=64)
    a, b = seq("a", 24, 0), seq("b", 16, 1)
    sched.add(a)
    assert [c.seq for c in sched.schedule()] == [a]
    sched.add(b)
    a.num_computed = len(a.tokens)          # the chunk ran and sampled a token: a decodes next
    a.tokens.append(7)
    assert sched.schedule() == [a]          # its 7th block: 3 free, 1 reserved for a
    assert sched.schedule() == [a] and sched.waiting == [b] and b.table.blocks == []
    sched.drop(a)
    chunks = sched.schedule()
    assert [(c.seq, c.start, c.end) for c in chunks] == [(b, 0, 16)]
    assert sched.alloc.used == 4


def _run_mixed(prompts: list[tuple[int, int, int]], blocks: int, budget: int, cap: int) -> int:
    """Drive a mixed-step Scheduler by hand (no model): (arrival step, prompt, max_tokens) per
    request, the configured `budget` and a step prefill `cap` (<= budget) in force. Checks each
    step's invariants; returns the steps taken."""
    from dynabatch.worker_svc.engine.scheduler import PrefillChunk
    alloc = BlockAllocator(blocks)
    sched = Scheduler(SimpleNamespace(allocator=alloc, block_size=4), max_running=6,
                      token_budget=budget, mixed=True)
    sched.set_step_cap(cap)
    pending = sorted(enumerate(prompts), key=lambda x: x[1][0])
    seqs: dict[str, Sequence] = {}
    step = 0
    while pending or sched.has_work():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, out) = pending.pop(0)
            seqs[f"r{i}"] = s = Sequence(SequenceRequest(f"r{i}", [1] * prompt, max_tokens=out),
                                         i, eos_ids=())
            sched.add(s)
        decoding = [s for s in sched.running if len(s.tokens) - s.num_computed == 1]
        batch = sched.schedule()
        step += 1
        assert step < 5000
        if not batch:
            assert not sched.running or pending, "work left but nothing scheduled"
            continue
        ran = [c.seq for c in batch] if isinstance(batch[0], PrefillChunk) else list(batch)
        assert len(ran) == len({id(s) for s in ran}), "a sequence twice in one step"
        if isinstance(batch[0], PrefillChunk):
            carries_decodes = any(c.decode for c in batch)
            assert sum(c.end - c.start for c in batch if not c.decode) <= \
                (cap if carries_decodes else budget)
            kept = {id(s) for s in decoding if s.row >= 0}      # not preempted by this step
            assert kept <= {id(c.seq) for c in batch if c.decode}
            for c in batch:
                assert c.end <= len(c.seq.table.blocks) * 4     # its K/V has blocks
                c.seq.num_computed = c.end
            done = [c.seq for c in batch if c.wants_logits]
        else:
            for s in batch:
                assert s.num_computed < len(s.table.blocks) * 4
                s.num_computed += 1
            done = list(batch)
        for s in done:
            s.tokens.append(2)
            if len(s.tokens) - s.num_prompt >= s.req.max_tokens:
                sched.drop(s)
        held = sum(len(s.table.blocks) for s in sched.running)
        assert alloc.used == held, "blocks held outside the running sequences"
    assert alloc.used == 0
    assert all(len(s.tokens) - s.num_prompt == s.req.max_tokens for s in seqs.values())
    return step


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 40), st.integers(1, 12)),
                min_size=1, max_size=12),
       st.integers(12, 40), st.integers(1, 24), st.integers(1, 24))
@settings(max_examples=150, deadline=None)
def test_mixed_steps_never_leak_or_starve(prompts, blocks, budget, cap) -> None:
    """Any arrivals, pool, step budget and cap: every request finishes with exactly its tokens,
    each step holds a sequence once, carries every decode beside its prefill chunks (the chunks
    within the cap, or the budget in a step with no decode), and no block is held outside a
    running sequence."""
    if any(-(-(p + o) // 4) > blocks for _, p, o in prompts):
        return                                  # a request the pool can never hold
    _run_mixed(prompts, blocks, budget, min(cap, budget))
