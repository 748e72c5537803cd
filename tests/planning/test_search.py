"""The load search on its own, with synthetic probes whose SLO limit is known exactly."""

from __future__ import annotations

import pytest

from kvsim.planning import LoadPoint, search_max_load


def threshold_probe(limit: float, calls: list[float] | None = None):
    """A probe that meets the SLOs at loads up to `limit` and misses above it."""

    def probe(load: float) -> LoadPoint:
        if calls is not None:
            calls.append(load)
        return LoadPoint(load=load, slo_met=load <= limit, ttft_p99_s=None, tpot_p99_s=None, e2e_latency_p99_s=None)

    return probe


@pytest.mark.parametrize("limit", [0.37, 3.0, 13.7, 100.0, 2999.0])
def test_rate_found_within_tolerance(limit):
    result = search_max_load(threshold_probe(limit), start=4.0, tolerance=0.05)
    assert result.status == "found"
    assert result.max_load <= limit
    assert result.max_load >= limit / 1.05


def test_every_lower_probe_met():
    result = search_max_load(threshold_probe(13.7), start=4.0, tolerance=0.01)
    for point in result.points:
        assert point.slo_met == (point.load <= result.max_load)


def test_probes_listed_in_load_order():
    result = search_max_load(threshold_probe(13.7), start=4.0, tolerance=0.05)
    loads = [point.load for point in result.points]
    assert loads == sorted(loads)
    assert len(set(loads)) == len(loads)


def test_doubling_then_bisection_sequence():
    calls: list[float] = []
    result = search_max_load(threshold_probe(10.0, calls), start=1.0, tolerance=0.1)
    # Up: 1, 2, 4, 8 meet, 16 misses; then midpoints of [8, 16]: 12 misses, 10 meets, 11 misses.
    # 11 − 10 = 1 ≤ 0.1 × 10, so the search stops at 10.
    assert calls == [1.0, 2.0, 4.0, 8.0, 16.0, 12.0, 10.0, 11.0]
    assert result.max_load == 10.0


def test_halving_when_start_misses():
    calls: list[float] = []
    result = search_max_load(threshold_probe(1.1, calls), start=8.0, tolerance=0.25)
    # Down: 8, 4, 2 miss, 1 meets; then 1.5 misses, 1.25 misses; 1.25 − 1 ≤ 0.25 × 1.
    assert calls == [8.0, 4.0, 2.0, 1.0, 1.5, 1.25]
    assert result.max_load == 1.0


def test_whole_users_end_adjacent():
    result = search_max_load(threshold_probe(37.0), start=5.0, tolerance=0.001, integer=True)
    assert result.status == "found"
    assert result.max_load == 37.0
    assert all(point.load == int(point.load) for point in result.points)


def test_one_user_missing_is_never_met():
    calls: list[float] = []
    result = search_max_load(threshold_probe(0.5, calls), start=6.0, tolerance=0.05, integer=True)
    assert result.status == "never_met"
    assert result.max_load is None
    assert calls == [6.0, 3.0, 1.0]


def test_rate_never_met_stops_at_min_load():
    calls: list[float] = []
    result = search_max_load(threshold_probe(-1.0, calls), start=4.0, tolerance=0.05, max_steps=5)
    assert result.status == "never_met"
    assert min(calls) == pytest.approx(4.0 / 2**5)
    assert len(calls) == 6


def test_always_met_is_unbounded():
    result = search_max_load(threshold_probe(float("inf")), start=1.0, tolerance=0.05, max_steps=4)
    assert result.status == "unbounded"
    assert result.max_load == 16.0


def test_upper_bound_met_stops_there():
    calls: list[float] = []
    result = search_max_load(threshold_probe(1000.0, calls), start=1.0, tolerance=0.05, upper=50.0)
    assert result.status == "at_max_load"
    assert result.max_load == 50.0
    assert calls == [50.0]


def test_upper_bound_searched_downward():
    result = search_max_load(threshold_probe(7.0), start=1.0, tolerance=0.02, upper=50.0)
    assert result.status == "found"
    assert 7.0 / 1.02 <= result.max_load <= 7.0


def test_noise_above_limit_is_not_taken():
    # Met up to 10, missed in (10, 12], met again in (12, 13] by luck, missed above.
    def probe(load: float) -> LoadPoint:
        met = load <= 10.0 or 12.0 < load <= 13.0
        return LoadPoint(load=load, slo_met=met, ttft_p99_s=None, tpot_p99_s=None, e2e_latency_p99_s=None)

    result = search_max_load(probe, start=1.0, tolerance=0.01)
    # Whatever the search saw, no probe at or below its result missed, and none above it met.
    below = [point for point in result.points if point.load <= result.max_load]
    above = [point for point in result.points if point.load > result.max_load]
    assert all(point.slo_met for point in below)
    assert not any(point.slo_met for point in above)


def test_tolerance_must_be_positive():
    with pytest.raises(ValueError, match="tolerance"):
        search_max_load(threshold_probe(1.0), start=1.0, tolerance=0.0)
