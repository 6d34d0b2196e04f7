"""The engine's step scheduler on a bare block pool (no model): admission against free KV."""
from __future__ import annotations

from types import SimpleNamespace

from dynabatch.worker_svc.engine.api import SequenceRequest
from dynabatch.worker_svc.engine.kv_cache import BlockAllocator
from dynabatch.worker_svc.engine.scheduler import Scheduler
from dynabatch.worker_svc.engine.sequence import Sequence


def seq(rid: str, prompt: int, arrival: int) -> Sequence:
    return Sequence(SequenceRequest(rid, [1] * prompt, max_tokens=8), arrival, eos_ids=())


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
