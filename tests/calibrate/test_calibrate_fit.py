"""The least-squares fit: recovery of known coefficients, non-negativity and held-out errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from calibrate.fit import (
    fit_relative,
    fit_trimmed,
    fit_with_holdout,
    held_out_mask,
    nonnegative_least_squares,
    pooled_errors,
)


@dataclass
class Sample:
    num_seqs: float
    bytes_moved: float
    flops: float
    time_s: float


def synthetic(time_of, *, num_points=12):
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(num_points):
        seqs = float(rng.integers(1, 64))
        moved = float(rng.uniform(1e6, 1e9))
        flops = float(rng.uniform(1e6, 1e11))
        samples.append(Sample(seqs, moved, flops, time_of(seqs, moved, flops)))
    return samples


def test_fit_recovers_launch_plus_bytes():
    samples = synthetic(lambda seqs, moved, flops: 1e-5 + 2e-12 * moved)
    result = fit_with_holdout(samples, ("fixed_s", "per_byte_s"))
    assert result.coefficients["fixed_s"] == pytest.approx(1e-5, rel=1e-9)
    assert result.coefficients["per_byte_s"] == pytest.approx(2e-12, rel=1e-9)
    assert result.median_abs_pct_error < 1e-9
    assert result.p90_abs_pct_error < 1e-9


def test_fit_recovers_all_four_terms():
    def time_of(seqs, moved, flops):
        return 3e-6 + 4e-7 * seqs + 5e-12 * moved + 6e-13 * flops

    coefficients = fit_relative(synthetic(time_of, num_points=20),
                                ("fixed_s", "per_seq_s", "per_byte_s", "per_flop_s"))
    assert coefficients["fixed_s"] == pytest.approx(3e-6, rel=1e-6)
    assert coefficients["per_seq_s"] == pytest.approx(4e-7, rel=1e-6)
    assert coefficients["per_byte_s"] == pytest.approx(5e-12, rel=1e-6)
    assert coefficients["per_flop_s"] == pytest.approx(6e-13, rel=1e-6)


def test_unused_terms_stay_zero():
    samples = synthetic(lambda seqs, moved, flops: 1e-5 + 2e-12 * moved)
    coefficients = fit_relative(samples, ("fixed_s", "per_byte_s"))
    assert coefficients["per_seq_s"] == 0.0
    assert coefficients["per_flop_s"] == 0.0


def test_nnls_clamps_negative_coefficient():
    # b = 2 - x exactly, so unconstrained least squares gives (2, -1). With x >= 0: the second
    # column alone wants (1·1 + 2·0 + 3·(-1)) / 14 < 0, and the first alone wants mean(b) = 0,
    # so the optimum is (0, 0).
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([1.0, 0.0, -1.0])
    unconstrained, *_ = np.linalg.lstsq(a, b, rcond=None)
    assert unconstrained == pytest.approx([2.0, -1.0])
    assert nonnegative_least_squares(a, b) == pytest.approx([0.0, 0.0])


def test_nnls_keeps_positive_solution_exact():
    a = np.array([[1.0, 2.0], [1.0, 5.0], [1.0, 9.0]])
    b = a @ np.array([0.5, 0.25])
    assert nonnegative_least_squares(a, b) == pytest.approx([0.5, 0.25])


def test_held_out_every_fourth():
    mask = held_out_mask(10)
    assert np.flatnonzero(mask).tolist() == [3, 7]


def test_too_few_points_hold_nothing_out():
    assert not held_out_mask(4).any()


def test_held_out_error_measured_on_held_out_points():
    # A slow outlier at held-out index 3 must show up in the error. The other held-out point, 7,
    # lies on the line and scores zero.
    samples = synthetic(lambda seqs, moved, flops: 1e-5 + 2e-12 * moved, num_points=8)
    samples[3].time_s *= 1.5
    result = fit_with_holdout(samples, ("fixed_s", "per_byte_s"))
    assert result.held_out.tolist() == [False, False, False, True, False, False, False, True]
    assert result.abs_pct_errors[0] == pytest.approx(1 / 3, rel=1e-6)  # predicted t, measured 1.5 t
    assert result.abs_pct_errors[1] == pytest.approx(0.0, abs=1e-9)


def test_pooled_errors_over_fits():
    samples = synthetic(lambda seqs, moved, flops: 1e-5 + 2e-12 * moved, num_points=8)
    fit = fit_with_holdout(samples, ("fixed_s", "per_byte_s"))
    median, p90, count = pooled_errors([fit, fit])
    assert count == 4
    assert median == pytest.approx(0.0, abs=1e-9)
    assert p90 == pytest.approx(0.0, abs=1e-9)


def test_trimmed_fit_ignores_gross_outlier():
    samples = synthetic(lambda seqs, moved, flops: 1e-5 + 2e-12 * moved, num_points=12)
    samples[5].time_s *= 10  # a call slowed by another process
    coefficients = fit_trimmed(samples, ("fixed_s", "per_byte_s"))
    assert coefficients["fixed_s"] == pytest.approx(1e-5, rel=1e-6)
    assert coefficients["per_byte_s"] == pytest.approx(2e-12, rel=1e-6)


def test_trimmed_fit_keeps_clean_points():
    samples = synthetic(lambda seqs, moved, flops: 1e-5 + 2e-12 * moved, num_points=12)
    assert fit_trimmed(samples, ("fixed_s", "per_byte_s")) == fit_relative(samples, ("fixed_s", "per_byte_s"))
