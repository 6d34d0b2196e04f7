"""Algorithm 1 (memory-aware bound) and the hard KV reservation."""
from dynabatch.scheduler_svc.policy.memory import (b_mem, blocks, blocks_per_seq,
                                                   committed_blocks, reservation)

from .helpers import running, worker


def test_blocks_round_up():
    assert [blocks(t, 16) for t in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_b_mem_formula_and_clamps():
    # floor(1000 * 0.9 / 10) = 90
    assert b_mem(1000, 0.9, 10.0, running=0, b_min=1, b_max=256) == 90
    assert b_mem(1000, 0.9, 10.0, running=0, b_min=1, b_max=64) == 64          # b_max
    assert b_mem(1000, 0.9, 500.0, running=0, b_min=4, b_max=64) == 4           # b_min
    assert b_mem(1000, 0.9, 500.0, running=7, b_min=4, b_max=64) == 7           # running
    assert b_mem(1000, 0.9, 500.0, running=100, b_min=4, b_max=64) == 64        # b_max wins


def test_blocks_per_seq_measured_when_enough_run():
    w = worker(total=1000, used=200, assigned=running(8))
    assert blocks_per_seq(w, predicted_blocks=3.0, few_running=4) == 25.0      # used / running


def test_blocks_per_seq_predicted_when_few_run():
    w = worker(total=1000, used=200, assigned=running(2))
    assert blocks_per_seq(w, predicted_blocks=3.0, few_running=4) == 3.0


def test_reservation_counts_prompt_and_predicted_output():
    w = worker(block=16)
    assert reservation(100, 60, 0, w, reserve_output=True) == 10               # 160 tokens
    assert reservation(100, 60, 80, w, reserve_output=True) == 12              # outgrew: 180
    assert reservation(100, 60, 0, w, reserve_output=False) == 7               # prompt only


def test_reservation_capped_by_model_len_and_pool():
    assert reservation(100, 10_000, 0, worker(max_model_len=512), True) == 32
    assert reservation(100, 10_000, 0, worker(total=20, max_model_len=0), True) == 20


def test_committed_is_max_of_reported_and_reserved():
    w = worker(used=5, assigned=running(3, prompt=16, predicted=16))           # 3 × 2 blocks
    assert committed_blocks(w, True) == 6
    w = worker(used=50, assigned=running(3, prompt=16, predicted=16))
    assert committed_blocks(w, True) == 50
