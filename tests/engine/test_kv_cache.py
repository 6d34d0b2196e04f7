from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynabatch.worker_svc.engine.kv_cache import BlockAllocator, BlockTable


def test_allocate_returns_none_and_takes_nothing_when_short() -> None:
    alloc = BlockAllocator(4)
    assert alloc.allocate(3) is not None
    assert alloc.allocate(2) is None
    assert (alloc.used, alloc.free) == (3, 1)


def test_double_free_is_detected() -> None:
    alloc = BlockAllocator(2)
    got = alloc.allocate(2)
    alloc.release(got)
    with pytest.raises(RuntimeError):
        alloc.release(got)


def test_block_zero_is_never_handed_out() -> None:
    alloc = BlockAllocator(5)
    assert sorted(alloc.allocate(5)) == [1, 2, 3, 4, 5]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 70)), max_size=40))
def test_tables_never_share_or_leak_blocks(ops: list[tuple[int, int]]) -> None:
    alloc = BlockAllocator(16)
    tables = [BlockTable() for _ in range(6)]
    for which, tokens in ops:
        t = tables[which]
        before = len(t.blocks)
        ok = t.ensure(alloc, tokens, block_size=8)
        if ok:
            assert t.capacity(8) >= tokens
        else:
            assert len(t.blocks) == before
        if tokens == 0:
            t.release(alloc)
        held = [b for tb in tables for b in tb.blocks]
        assert len(held) == len(set(held)) == alloc.used
    for t in tables:
        t.release(alloc)
    assert alloc.free == alloc.total
