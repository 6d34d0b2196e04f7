"""The SLA's cap on a step's prompt tokens (policy/prefill_cap.py) and where decide() puts it."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dynabatch.scheduler_svc.policy import Assigned, PolicyConfig, make_policy
from dynabatch.scheduler_svc.policy.prefill_cap import (MIN_TOKENS, slack_tokens,
                                                        step_prefill_tokens)

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


# slack_tokens: TPOT 10 ms, decode step 6 ms, 50k prompt tokens/s, refreshed every 25 steps.
def _slack(*running, now: float = 100.0) -> int:
    return slack_tokens(list(running), now, 6.0, 50_000, 25)


def test_a_long_fresh_request_lets_the_chunk_grow_past_the_step_rule() -> None:
    # 300 tokens to come at 4 ms of room each = 1.2 s, spread over the next 25 steps: 48 ms a
    # step, 2,400 tokens; the step rule gives 200.
    assert _slack((0.010, 1, 301, 100.0)) == 2400
    assert _slack((0.010, 1, 301, 0.0)) == 2400      # no first-token time: on target so far


def test_a_request_with_little_left_or_late_holds_the_chunk_down() -> None:
    on_target = (0.010, 101, 102, 99.0)               # 100 intervals in 1 s, one to come
    assert _slack(on_target) == 200                   # 4 ms of room: the step rule's chunk
    assert _slack((0.010, 1, 301, 100.0), on_target) == 200     # the tightest one counts
    late = (0.010, 50, 100, 99.25)                    # 49 intervals in 750 ms: over budget
    assert _slack(late) == 0
    past = (0.010, 150, 100, 98.5)                    # past its prediction: may end now
    assert _slack(past) == 0
    assert _slack() == 0


@given(reqs=st.lists(st.tuples(st.floats(0.005, 0.1), st.integers(1, 500), st.integers(1, 800),
                               st.floats(0.0, 30.0)), min_size=1, max_size=8),
       step=st.floats(1.0, 50.0), rate=st.floats(1e3, 1e6), horizon=st.floats(0.5, 100))
def test_chunks_of_the_slack_cap_keep_every_budget(reqs, step, rate, horizon) -> None:
    """Steps of decode + the cap's chunk for the horizon (or to the request's end), then plain
    decode steps: no request that was on budget goes over its (n - 1) x target."""
    now = 40.0
    running = [(t, g, n, now - ago) for t, g, n, ago in reqs]
    cap = slack_tokens(running, now, step, rate, horizon)
    if cap == 0:
        return
    extra_ms = cap * 1000.0 / rate
    for t, g, n, first in running:
        n = max(n, g + 1)
        left = n - g
        k = min(left, max(1.0, horizon))
        taken = (now - first) * 1000 + k * (step + extra_ms) + (left - k) * step
        assert taken <= t * 1000 * (n - 1) * (1 + 1e-9) + 1e-6


def test_decide_sends_the_larger_of_the_step_rule_and_the_slack() -> None:
    cfg = PolicyConfig(tpot_target_s=0.010, eps=0.0, step_cap_horizon_s=0.25)
    w = _workers()[0]
    fresh = Assigned("long", 64, 301, 1, 0, first_token_s=1.0)
    busy = w.__class__(**{**w.__dict__, "assigned": (fresh,)})
    d = make_policy("dynamic", cfg).decide([], [busy], now=1.0)
    assert d.step_prefill_tokens == {"w0": 2400}      # 25 steps of refresh at 10 ms
    ending = Assigned("short", 64, 2, 1, 0, first_token_s=1.0)
    busy = w.__class__(**{**w.__dict__, "assigned": (fresh, ending)})
    assert make_policy("dynamic", cfg).decide([], [busy], 1.0).step_prefill_tokens == {"w0": 200}


def test_a_zero_horizon_keeps_the_step_rule_alone() -> None:
    cfg = PolicyConfig(tpot_target_s=0.010, eps=0.0, step_cap_horizon_s=0.0)
    w = _workers()[0]
    fresh = Assigned("long", 64, 301, 1, 0, first_token_s=1.0)
    busy = w.__class__(**{**w.__dict__, "assigned": (fresh,)})
    assert make_policy("dynamic", cfg).decide([], [busy], now=1.0).step_prefill_tokens == {"w0": 200}
