"""Selection order: urgency + short-job bonus, class priority, resumed first, forced past
max_wait."""
import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from dynabatch.scheduler_svc.policy import PolicyConfig
from dynabatch.scheduler_svc.policy.priority import (PRESSURE_CAP, base_key, deadline_of,
                                                     deadline_pressure, first, key_at, score,
                                                     short_bonus, ttft_budget)

from .helpers import req

CFG = PolicyConfig(max_wait_s=10.0, short_job_weight=1.0, short_job_tokens=128)


def order(reqs, preds, now, cfg=CFG):
    """Ids in the order the policy takes them (firsts by arrival, then by key)."""
    firsts = sorted((r for r in reqs if first(r, now, cfg)), key=lambda r: r.arrival_s)
    rest = sorted((r for r in reqs if not first(r, now, cfg)),
                  key=lambda r: key_at(base_key(r, preds[r.request_id], cfg), deadline_of(r),
                                       now, cfg, ttft_budget(r, cfg)))
    return [r.request_id for r in firsts + rest]


def test_short_job_bonus_decreases_with_length():
    assert short_bonus(0, CFG) == 1.0
    assert short_bonus(128, CFG) == 0.5
    assert short_bonus(10_000, CFG) < 0.02


def test_urgency_grows_with_waiting():
    r = req("a", at=0.0)
    assert score(r, 64, 5.0, CFG) - score(r, 64, 0.0, CFG) == pytest.approx(0.5)


def test_deadline_pressure_is_relative_to_the_ttft_budget():
    u = CFG.short_job_weight + 1.0                        # in units of bonus + waited range
    assert deadline_pressure(None, 0.0, CFG, 2.0) == 0.0
    assert deadline_pressure(20.0, 0.0, CFG, 2.0) == 0.0  # slack >= budget
    assert deadline_pressure(2.0, 0.0, CFG, 2.0) == 0.0
    assert deadline_pressure(1.0, 0.0, CFG, 2.0) == pytest.approx(u)       # half the budget
    assert deadline_pressure(0.5, 0.0, CFG, 2.0) == pytest.approx(3 * u)
    assert deadline_pressure(0.0, 0.0, CFG, 2.0) == PRESSURE_CAP * u      # missed: capped
    assert deadline_pressure(-1.0, 0.0, CFG, 2.0) == PRESSURE_CAP * u
    assert deadline_pressure(10.0, 0.0, CFG, 20.0) == pytest.approx(u)     # own, longer budget
    assert deadline_of(req("a", at=1.0, ttft=2.0, deadline=10.0)) == 3.0
    assert deadline_of(req("a", at=1.0, deadline=10.0)) == 10.0


def test_ttft_threatened_long_request_is_not_overtaken_by_short_ones():
    """Same 2 s TTFT target: a long request past half its budget goes before fresh short
    ones (scaled by max_wait, its pressure rose 0.2 over the 2 s and they overtook it)."""
    preds = {"long": 4000, "short": 1}
    early = [req("long", at=0.0, ttft=2.0), req("short", at=0.2, ttft=2.0)]
    assert order(early, preds, 0.2) == ["short", "long"]      # long has 90% of its budget
    late = [req("long", at=0.0, ttft=2.0), req("short", at=1.0, ttft=2.0)]
    assert order(late, preds, 1.0) == ["long", "short"]       # half of it left


def test_short_job_first_among_equals():
    reqs = [req("long", at=0.0), req("short", at=0.0)]
    assert order(reqs, {"long": 1000, "short": 10}, 1.0) == ["short", "long"]


def test_older_first_when_same_length():
    reqs = [req("new", at=5.0), req("old", at=1.0)]
    assert order(reqs, {"new": 64, "old": 64}, 6.0) == ["old", "new"]


def test_class_priority_dominates_score():
    reqs = [req("low", at=0.0, prio=1), req("high", at=8.0, prio=3), req("normal", at=0.0)]
    preds = {"low": 1, "high": 4000, "normal": 1}
    assert order(reqs, preds, 9.0) == ["high", "normal", "low"]


def test_unspecified_priority_is_normal():
    reqs = [req("zero", at=0.0, prio=0), req("low", at=0.0, prio=1)]
    assert order(reqs, {"zero": 64, "low": 64}, 1.0) == ["zero", "low"]


def test_resumed_goes_to_front_of_its_class_only():
    reqs = [req("fresh", at=0.0), req("resumed", at=5.0, resumed=True), req("high", at=5.0, prio=3)]
    preds = {"fresh": 1, "resumed": 4000, "high": 4000}
    assert order(reqs, preds, 6.0) == ["high", "resumed", "fresh"]


def test_forced_past_max_wait_ahead_of_every_class_oldest_first():
    reqs = [req("high", at=9.0, prio=3), req("late2", at=0.5, prio=1), req("late1", at=0.0, prio=1)]
    preds = {"high": 1, "late2": 4000, "late1": 4000}
    assert order(reqs, preds, 10.5) == ["late1", "late2", "high"]


def test_fifo_orders_by_arrival_resumed_first():
    cfg = PolicyConfig(ordering="fifo")
    reqs = [req("b", at=2.0, prio=3), req("a", at=1.0, prio=1), req("r", at=3.0, resumed=True)]
    assert order(reqs, {"a": 1, "b": 1, "r": 1}, 100.0, cfg) == ["r", "a", "b"]


requests = st.builds(
    lambda i, at, prio, resumed, dl, pred: (req(f"r{i}", at=at, prio=prio, resumed=resumed,
                                                 deadline=dl), pred),
    st.integers(0, 10**6), st.floats(0, 9.99), st.integers(0, 3), st.booleans(),
    st.one_of(st.none(), st.floats(0, 40)), st.integers(1, 4096))


@settings(max_examples=300, deadline=None)
@given(a=requests, b=requests, weight=st.floats(0, 5), epoch=st.sampled_from([0.0, 1.7e9]))
def test_float_key_orders_like_the_tuple(a, b, weight, epoch):
    """The cached float key orders non-forced requests exactly like
    (−class, not resumed, −score) — the documented rule — also on a Unix-time clock."""
    cfg = PolicyConfig(max_wait_s=10.0, short_job_weight=weight)
    now = epoch + 10.0 - 1e-3                          # nobody forced

    def shift(r):
        dl = None if r.queue_deadline_s is None else r.queue_deadline_s + epoch
        return dataclasses.replace(r, arrival_s=r.arrival_s + epoch, queue_deadline_s=dl)
    (ra, pa), (rb, pb) = (shift(a[0]), a[1]), (shift(b[0]), b[1])

    def tup(r, p):
        return (-(r.priority or 2), not r.resumed, -score(r, p, now, cfg))

    def flt(r, p):
        return key_at(base_key(r, p, cfg), deadline_of(r), now, cfg, ttft_budget(r, cfg))

    ta, tb, fa, fb = tup(ra, pa), tup(rb, pb), flt(ra, pa), flt(rb, pb)
    if abs(ta[2] - tb[2]) > 1e-5 or ta[:2] != tb[:2]:      # ignore float ties
        assert (ta < tb) == (fa < fb)
