"""The SLA's cap on a step's prompt tokens (policy/prefill_cap.py) and where decide() puts it."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dynabatch.scheduler_svc.policy import PolicyConfig, make_policy
from dynabatch.scheduler_svc.policy.prefill_cap import MIN_TOKENS, step_prefill_tokens

from .helpers import req, running, worker


def test_the_cap_fills_the_room_the_decode_step_leaves() -> None:
    # TPOT 10 ms, eps 0: 4 ms left beside a 6-ms decode step, at 50k prompt tokens/s = 200.
    assert step_prefill_tokens(6.0, 50_000, 0, 0.010, 0.0) == 200
    assert step_prefill_tokens(6.0, 50_000, 8192, 0.010, 0.0) == 200     # lower: at once
    assert step_prefill_tokens(6.0, 50_000, 100, 0.010, 0.0) == 150      # higher: half way
    assert step_prefill_tokens(12.0, 50_000, 0, 0.010, 0.0) == MIN_TOKENS  # no room: floor


def test_nothing_measured_sends_nothing() -> None:
    assert step_prefill_tokens(0.0, 50_000, 0, 0.01, 0.02) == 0
    assert step_prefill_tokens(5.0, 0.0, 0, 0.01, 0.02) == 0


@given(step=st.floats(0.1, 100), rate=st.floats(1, 1e6), current=st.integers(0, 1 << 16),
       tpot=st.floats(0.001, 1.0), eps=st.floats(0, 0.5))
def test_the_cap_never_overshoots_the_target(step, rate, current, tpot, eps) -> None:
    cap = step_prefill_tokens(step, rate, current, tpot, eps)
    assert cap >= MIN_TOKENS
    if cap > MIN_TOKENS:      # decode step + the chunk's time at the measured rate fits
        assert step / 1000 + cap / rate <= tpot * (1 - eps) + 1e-9
    free = step_prefill_tokens(step, rate, 0, tpot, eps)
    assert cap <= free        # a step up from the cap in force goes part way, never past
    assert cap == free or current <= cap < free


def _workers():
    w = worker(step_ms=6.0, batch=2, steps=5)
    return [w.__class__(**{**w.__dict__, "prefill_tokens_per_s": 50_000.0,
                           "step_prefill_tokens": 8192})]


def test_dynamic_policies_cap_the_step_and_fcfs_does_not() -> None:
    cfg = PolicyConfig(tpot_target_s=0.010, eps=0.0)
    for name in ("dynamic", "multibin"):
        d = make_policy(name, cfg).decide([req("a")], _workers(), now=1.0)
        assert d.step_prefill_tokens == {"w0": 200}
    assert make_policy("fcfs", cfg).decide([req("a")], _workers(), 1.0).step_prefill_tokens == {}
    off = PolicyConfig(tpot_target_s=0.010, eps=0.0, sla_prefill=False)
    assert make_policy("dynamic", off).decide([req("a")], _workers(), 1.0).step_prefill_tokens == {}


def test_a_worker_that_takes_no_cap_gets_none() -> None:
    """An engine whose steps alternate reports step_prefill_tokens 0: no cap is sent to it."""
    w = _workers()[0]
    alternating = w.__class__(**{**w.__dict__, "step_prefill_tokens": 0})
    cfg = PolicyConfig(tpot_target_s=0.010, eps=0.0)
    assert make_policy("dynamic", cfg).decide([req("a")], [alternating], 1.0).step_prefill_tokens == {}


def test_the_cap_follows_the_requests_targets_and_an_idle_worker_keeps_its_own() -> None:
    """The cap uses the tightest target of the worker's requests, those sent in this decision
    included (here 8 ms against the 50-ms default: 2 ms of room at 50k tok/s = 100 tokens); a
    worker with none gets no new cap, so the default cannot raise it between busy spells."""
    cfg = PolicyConfig(tpot_target_s=0.050, eps=0.0)
    d = make_policy("dynamic", cfg).decide([req("a", tpot=0.008)], _workers(), now=1.0)
    assert d.assignments == {"w0": ["a"]} and d.step_prefill_tokens == {"w0": 100}
    assert make_policy("dynamic", cfg).decide([], _workers(), now=1.0).step_prefill_tokens == {}
    busy = _workers()[0]
    busy = busy.__class__(**{**busy.__dict__, "assigned": running(1)})
    d = make_policy("dynamic", cfg).decide([], [busy], now=1.0)
    assert d.step_prefill_tokens == {"w0": (44 * 50_000) // 1000}     # the default, 50 ms
