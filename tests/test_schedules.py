"""Pipeline schedules as data: each one's properties, without running anything."""
import pytest

from dpo_lab.parallel.schedules import (Action, bubble_formula, bubble_fraction, dependencies,
                                        gpipe, interleaved_1f1b, make_schedule, one_f_one_b,
                                        peak_in_flight, simulate)

SETTINGS = [("gpipe", p, m, 1) for p in (1, 2, 4) for m in (1, 3, 8)] + \
           [("1f1b", p, m, 1) for p in (1, 2, 4) for m in (1, 2, 3, 8)] + \
           [("interleaved", p, m, v) for p in (2, 4) for m in (p, 2 * p) for v in (2, 3)]


@pytest.mark.parametrize("name,p,m,v", SETTINGS)
def test_each_stage_runs_every_forward_and_backward_once_forward_first(name, p, m, v):
    for stage in make_schedule(name, p, m, v):
        expected = {(k, i, c) for k in "FB" for i in range(m) for c in range(v)}
        assert sorted((a.kind, a.microbatch, a.chunk) for a in stage) == sorted(expected)
        position = {a: i for i, a in enumerate(stage)}
        for i in range(m):
            for c in range(v):
                assert position[Action("F", i, c)] < position[Action("B", i, c)]


@pytest.mark.parametrize("name,p,m,v", SETTINGS)
def test_dependencies_between_stages_are_respected(name, p, m, v):
    timeline = simulate(make_schedule(name, p, m, v))  # raises on a deadlock
    end = {(r, a): e for r, stage in enumerate(timeline) for a, _, e in stage}
    for r, stage in enumerate(timeline):
        for a, start, _ in stage:
            for dep in dependencies(a, r, p, v):
                assert end[dep] <= start, (r, a, dep)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 2), (4, 8), (3, 1), (5, 3)])
def test_1f1b_warmup_is_min_p_minus_r_minus_1_m(p, m):
    for r, stage in enumerate(one_f_one_b(p, m)):
        first_b = next(i for i, a in enumerate(stage) if a.kind == "B")
        assert first_b == min(p - r - 1, m) + (1 if m > p - r - 1 else 0)
        # warm-up forwards, then (if any forward is left) exactly one more before the first backward
        warmup = min(p - r - 1, m)
        assert all(a.kind == "F" for a in stage[:warmup])


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 2)])
def test_peak_in_flight_m_for_gpipe_at_most_p_for_1f1b(p, m):
    assert peak_in_flight(gpipe(p, m)) == [m] * p
    assert peak_in_flight(one_f_one_b(p, m)) == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize("name,p,m,v", SETTINGS)
def test_simulated_bubble_equals_formula_with_uniform_compute(name, p, m, v):
    measured = bubble_fraction(simulate(make_schedule(name, p, m, v), t_f=1.0, t_b=2.0))
    assert measured == pytest.approx(bubble_formula(p, m, v), abs=1e-12)


def test_interleaving_shrinks_the_bubble_by_v():
    plain = bubble_fraction(simulate(one_f_one_b(4, 8)))
    inter = bubble_fraction(simulate(interleaved_1f1b(4, 8, 2)))
    assert inter < plain
    x_plain, x_inter = plain / (1 - plain), inter / (1 - inter)  # bubble / ideal
    assert x_inter == pytest.approx(x_plain / 2)


def test_a_bad_schedule_deadlocks_and_is_reported():
    bad = one_f_one_b(2, 2)
    bad[0] = [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)]  # B0 waits on stage 1
    bad[1] = [Action("F", 1), Action("B", 1), Action("F", 0), Action("B", 0)]  # F1 waits on stage 0
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(bad)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        interleaved_1f1b(4, 6, 2)
    with pytest.raises(ValueError, match="m must be"):
        gpipe(2, 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zero-bubble", 2, 2)


@pytest.mark.parametrize("p,m,v", [(4, 8, 2), (2, 4, 3), (4, 4, 2)])
def test_interleaving_runs_the_same_work_in_less_time(p, m, v):
    """Each chunk is 1/v of a stage: the step takes (m + (p−1)/v)(t_f + t_b) interleaved against
    (m + p − 1)(t_f + t_b) for 1F1B, and both keep every stage busy for m(t_f + t_b)."""
    def span_and_busy(schedule):
        tl = simulate(schedule, t_f=1.0, t_b=2.0)
        span = max(e for st in tl for _, _, e in st) - min(s for st in tl for _, s, _ in st)
        return span, [sum(e - s for _, s, e in st) for st in tl]
    span_1, busy_1 = span_and_busy(one_f_one_b(p, m))
    span_v, busy_v = span_and_busy(interleaved_1f1b(p, m, v))
    assert busy_1 == [pytest.approx(3.0 * m)] * p and busy_v == [pytest.approx(3.0 * m)] * p
    assert span_1 == pytest.approx((m + p - 1) * 3.0)
    assert span_v == pytest.approx((m + (p - 1) / v) * 3.0)
