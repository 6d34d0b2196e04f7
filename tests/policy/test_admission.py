"""Admission control: bounded queue, early rejection when the deadline cannot be met."""
import pytest

from dynabatch.scheduler_svc.policy import PolicyConfig, make_policy
from dynabatch.scheduler_svc.policy.admission import QueueStats

from .helpers import req, running, worker

MEASURED = worker("w", step_ms=50.0, batch=10.0, steps=5)   # 10 slots, 100 tokens × 50 ms


def policy(**kw):
    return make_policy("dynamic", PolicyConfig(**kw))


def test_accepts_into_empty_queue():
    assert policy().admit(req("a"), [], [MEASURED], 0.0).accepted


def test_queue_full_by_requests():
    p = policy(max_queue_requests=3)
    waiting = [req(f"q{i}", max_tokens=100) for i in range(3)]
    a = p.admit(req("a", max_tokens=100), waiting, [MEASURED], 0.0)
    assert (a.accepted, a.reason) == (False, "queue_full")
    assert a.retry_after_s == pytest.approx(0.5)     # 1 request at 2 req/s


def test_queue_full_by_tokens():
    p = policy(max_queue_tokens=1000)
    waiting = [req("q", prompt=400, max_tokens=400)]
    assert not p.admit(req("a", prompt=100, max_tokens=101), waiting, [MEASURED], 0.0).accepted
    assert p.admit(req("a", prompt=100, max_tokens=100), waiting, [MEASURED], 0.0).accepted


def test_queue_full_retry_after_without_measurement_is_a_fallback():
    p = policy(max_queue_requests=1, max_wait_s=10.0)
    a = p.admit(req("a"), [req("q")], [worker("w")], 0.0)
    assert not a.accepted and a.retry_after_s == 1.0


def test_rejects_when_predicted_wait_exceeds_ttft_target():
    p = policy()
    waiting = [req(f"q{i}", max_tokens=100) for i in range(20)]
    # 2 req/s, 21 to go (20 ahead + itself), no free slot known: 10.5 s > 2 s
    a = p.admit(req("a", max_tokens=100, ttft=2.0), waiting, [MEASURED], 0.0)
    assert (a.accepted, a.reason) == (False, "deadline_unmeetable")
    assert a.retry_after_s == pytest.approx(8.5)
    assert p.admit(req("b", max_tokens=100, ttft=30.0, deadline=20.0), waiting, [MEASURED],
                   0.0).accepted
    assert not p.admit(req("c", max_tokens=100, ttft=30.0, deadline=5.0), waiting, [MEASURED],
                       0.0).accepted


def test_only_equal_or_higher_classes_count_ahead():
    p = policy()
    waiting = [req(f"q{i}", max_tokens=100, prio=1) for i in range(20)]
    assert p.admit(req("a", max_tokens=100, ttft=2.0, prio=3), waiting, [MEASURED], 0.0).accepted


def test_default_ttft_target_applies_to_requests_without_their_own():
    waiting = [req(f"q{i}", max_tokens=100) for i in range(200)]      # ~100 s of queue
    a = policy(ttft_target_s=2.0).admit(req("a", max_tokens=100), waiting, [MEASURED], 0.0)
    assert (a.accepted, a.reason) == (False, "deadline_unmeetable")
    assert policy(ttft_target_s=500.0).admit(req("a", max_tokens=100), waiting, [MEASURED],
                                             0.0).accepted


def test_without_measurement_only_the_bounds_apply():
    waiting = [req(f"q{i}", max_tokens=100) for i in range(200)]
    assert policy().admit(req("b", max_tokens=100, ttft=0.1), waiting, [worker("w")],
                          0.0).accepted


def test_free_slots_shorten_the_wait():
    p = policy()
    waiting = [req(f"q{i}", max_tokens=100) for i in range(20)]
    fast = worker("w", step_ms=20.0, batch=10.0, steps=5)
    p.decide([], [fast], 0.0)                          # learns the worker's b_target
    assert p.targets["w"] > 20
    assert p.admit(req("a", max_tokens=100, ttft=2.0), waiting, [fast], 0.0).accepted


def test_queue_statistics_follow_the_snapshot():
    p = policy(max_queue_requests=3)
    full = [req(f"q{i}") for i in range(3)]
    assert not p.admit(req("a"), full, [MEASURED], 0.0).accepted
    assert p.admit(req("a"), [], [MEASURED], 0.0).accepted          # another snapshot
    grown = full[:2]
    assert p.admit(req("a"), grown, [MEASURED], 0.0).accepted
    grown.append(req("q9"))                                          # same list, new length
    assert not p.admit(req("a"), grown, [MEASURED], 0.0).accepted
    grown.pop()                                                      # same list, shorter
    assert p.admit(req("a"), grown, [MEASURED], 0.0).accepted


def test_queue_statistics_extended_by_appends_equal_a_full_count():
    queue = [req("q0", prompt=10, prio=1), req("q1", max_tokens=7, prio=3)]
    stats = QueueStats.of(queue)
    queue += [req("q2", prio=0), req("q3", prompt=5, prio=3)]
    assert stats.extended(queue) == QueueStats.of(queue)


def one_blip(smoothing_s: float):
    """A worker measured at 5 ms steps for 10 s, then one feedback period at 100 ms (a burst of
    prefills): should 3 requests ahead and no free slot reject a 2 s TTFT target?"""
    p = policy(admission_smoothing_s=smoothing_s, b_max=8)
    for k in range(40):
        p.decide([], [worker("w", step_ms=5.0, batch=8.0, steps=k + 1,
                             assigned=running(8))], k * 0.25)
    blip = worker("w", step_ms=100.0, batch=8.0, steps=41, assigned=running(8))
    p.decide([], [blip], 10.25)
    waiting = [req(f"q{i}", max_tokens=100, at=10.0) for i in range(3)]
    return p.admit(req("a", max_tokens=100, ttft=2.0, at=10.25), waiting, [blip], 10.25)


def test_one_slow_feedback_period_does_not_reject():
    """Smoothed: the rate is still ~the 5 ms steps' (wait ≈ 0.3 s), so the request is admitted.
    Unsmoothed (0 s): 8 slots per 100 × 100 ms = 0.8 req/s, 4 to go = 5 s > 2 s: rejected."""
    assert one_blip(5.0).accepted
    assert one_blip(0.0).reason == "deadline_unmeetable"
