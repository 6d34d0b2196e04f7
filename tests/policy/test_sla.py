"""Algorithm 2: the SLA band controller, unit rules and convergence on D(b) = a + c·b."""
import math

from hypothesis import given, settings, strategies as st

from dynabatch.scheduler_svc.policy import SlaController

T = 0.05   # TPOT target, s


def ctl(**kw) -> SlaController:
    args = dict(b_min=1, b_max=256, eps=0.02, alpha=16, delta=8, step=0.05) | kw
    return SlaController(**args)


def test_starts_at_midpoint_of_full_range():
    c = ctl()
    assert (c.b_low, c.b_high, c.b_sla) == (1, 256, 128)


def test_violation_halves_high_and_lowers_low():
    c = ctl(b_min=1, b_max=256)
    c.b_low, c.b_high = 40.0, 120.0
    c.update(T * 1.5, 80, T)
    assert c.b_high == 40 + 1                      # max(80/2, b_low + 1)
    assert c.b_low == 40 - 4                       # delta step = 5% of 80
    c.b_low, c.b_high = 10.0, 120.0
    c.update(T * 1.5, 80, T)
    assert c.b_high == 40                          # b/2 when above b_low + 1


def test_headroom_raises_low_and_grows_high():
    c = ctl()
    c.b_low, c.b_high = 40.0, 120.0
    c.update(T * 0.5, 80, T)
    assert c.b_low == 80 and c.b_high == 124        # alpha step = 5% of 80
    c.update(T * 0.5, 250, T)
    assert c.b_high == 256                          # capped at b_max


def test_steps_capped_by_alpha_and_delta():
    c = ctl(alpha=3, delta=2)
    c.b_low, c.b_high = 100.0, 200.0
    c.update(T * 0.5, 150, T)
    assert c.b_high == 203
    c.update(T * 2, 150, T)
    assert c.b_low == 150 - 2


def test_dead_band_recentres_on_b():
    c = ctl()
    c.b_low, c.b_high = 40.0, 120.0
    c.update(T * 1.01, 70, T)                       # within eps = 2%
    assert (c.b_low, c.b_high, c.b_sla) == (30, 110, 70)


def test_dead_band_near_a_limit_keeps_b():
    c = ctl(b_min=1, b_max=256)
    c.update(T, 10, T)
    assert c.b_sla == 10 and c.b_low == 1


def test_band_stays_within_limits():
    c = ctl(b_min=4, b_max=64)
    for d in (10, 10, 10, 10, 0.001, 0.001, 0.001, 0.001, 0.001):
        c.update(T * d, c.b_sla, T)
        assert 4 <= c.b_low <= c.b_high <= 64


def _drive(c: SlaController, a: float, slope: float, n: int) -> list[int]:
    out = []
    for _ in range(n):
        b = c.b_sla
        c.update(a + slope * b, b, T)
        out.append(c.b_sla)
    return out


def _settled(trace: list[int], b_star: float, tail: int = 10) -> bool:
    """Within ±10% of b*, or on one of the two integers around it: batch sizes are whole, so
    for b* near 8 the ±10% window can hold a single integer and alternating floor(b*) and
    ceil(b*) is the best any controller can do (found by hypothesis: b*=8.17)."""
    return all(abs(b - b_star) <= 0.1 * b_star or math.floor(b_star) <= b <= math.ceil(b_star)
               for b in trace[-tail:])


@settings(max_examples=150, deadline=None)
@given(b_star=st.floats(8, 240), a_share=st.floats(0.0, 0.7),
       factor=st.sampled_from([0.5, 0.7, 1.5, 2.0]))
def test_converges_and_tracks_a_step_change(b_star, a_share, factor):
    """With D(b) = a + c·b, b_SLA settles within ±10% of b* (D(b*) = SLA) within 50 updates,
    and again within 50 updates after c changes."""
    a = a_share * T
    slope = (T - a) / b_star
    c = ctl()
    assert _settled(_drive(c, a, slope, 50), b_star)
    b_star2 = (T - a) / (slope * factor)
    if 8 <= b_star2 <= 250:
        assert _settled(_drive(c, a, slope * factor, 50), b_star2)


def test_closed_loop_through_the_policy_tracks_tpot_target():
    """Alg. 2 in the loop: a memory-rich worker with D(b) = 10 + c·b ms under a deep queue runs
    about b* = (50 − 10) / c sequences (TPOT target 50 ms), and follows c doubling."""
    from dynabatch.scheduler_svc.policy import PolicyConfig, make_policy

    from . import sim

    p = make_policy("dynamic", PolicyConfig(tpot_target_s=0.05, max_wait_s=1000.0))
    w = sim.SimWorker("a", total=10**6, a_ms=10.0, c_ms=0.5)
    seen: list[tuple[float, int]] = []

    def tick(now: float) -> None:
        if now >= 20.0:
            w.c_ms = 1.0
        seen.append((now, len(w.running)))

    sim.run(p, sim.workload(3, 60.0, 40.0), [w], until=40.0, on_tick=tick)
    before = [n for t, n in seen if 10.0 <= t < 20.0]
    after = [n for t, n in seen if 30.0 <= t < 40.0]
    assert all(abs(n - 80) <= 8 for n in before)
    assert all(abs(n - 40) <= 4 for n in after)
