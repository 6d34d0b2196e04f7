"""Output-length prediction and equal-mass bins."""
from dynabatch.scheduler_svc.policy import HistoryPredictor
from dynabatch.scheduler_svc.policy.bins import BinBoundaries, equal_mass
from dynabatch.scheduler_svc.policy.predict import bucket


def test_fallback_is_max_tokens():
    assert HistoryPredictor().predict(100, 512, 0) == 512


def test_client_hint_wins_within_max_tokens():
    p = HistoryPredictor()
    assert p.predict(100, 512, 40) == 40
    assert p.predict(100, 512, 4000) == 512


def test_history_per_prompt_bucket_high_quantile():
    p = HistoryPredictor(quantile=0.9, min_samples=10, refresh=1000)
    for out in range(1, 11):                        # bucket of prompt 100: outputs 1..10
        p.observe(100, out * 10)
    assert p.predict(100, 512, 0) == 100            # 90th percentile of 10..100
    assert p.predict(120, 512, 0) == 100            # same power-of-two bucket (64..127)
    assert p.predict(300, 512, 0) == 512            # other bucket: no history
    assert p.predict(100, 50, 0) == 50              # never above max_tokens


def test_prediction_stable_between_refreshes():
    p = HistoryPredictor(min_samples=2, refresh=5)
    p.observe(100, 10)
    p.observe(100, 10)
    v, first = p.version, p.predict(100, 512, 0)
    for _ in range(3):
        p.observe(100, 400)
    assert (p.version, p.predict(100, 512, 0)) == (v, first)
    for _ in range(2):
        p.observe(100, 400)
    assert p.version > v and p.predict(100, 512, 0) == 400


def test_bucket_is_power_of_two():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1000)] == [0, 1, 2, 2, 3, 3, 4, 10]


def test_equal_mass_boundaries():
    assert equal_mass(list(range(1, 101)), 4) == [25, 50, 75]
    b = BinBoundaries(4)
    b.boundaries = [25, 50, 75]
    counts = [0] * 4
    for v in range(1, 101):
        counts[b.bin_of(v)] += 1
    assert counts == [25, 25, 25, 25]


def test_initial_boundaries_follow_seed_002():
    assert BinBoundaries(4).boundaries == [64, 256, 1024]
    assert BinBoundaries(1).bin_of(10**6) == 0


def test_boundaries_reestimated_from_recent_completions():
    b = BinBoundaries(2, history=100, refresh=50)
    for v in range(49):
        b.observe(1000 + v)
    assert b.boundaries == [64]
    b.observe(1049)
    assert b.boundaries == [1024] and b.version == 1
