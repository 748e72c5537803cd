"""Least-squares fit of step-time terms to measured points, with non-negative coefficients and held-out errors.

Every operation kind is fitted with the linear form of `kvsim.profile`:

    time_s ≈ fixed_s + per_seq_s · seqs + per_byte_s · bytes + per_flop_s · FLOPs

using only the terms listed for that kind. The fit minimises the squared *relative* error, dividing
each row by its measured time. A 20 µs call then counts as much as a 200 ms one, and the fit
improves the percentage error that the profile reports. Coefficients are kept
non-negative so that no term can turn a larger shape into a shorter time.

numpy only: this module runs without torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvsim.profile import COEFFICIENT_NAMES

HOLDOUT_EVERY = 4
HOLDOUT_RULE = f"every {HOLDOUT_EVERY}th point of each op kind, in measurement order (indices 3, 7, 11, ...)"


class Measured(Protocol):
    num_seqs: float
    bytes_moved: float
    flops: float
    time_s: float


@dataclass(frozen=True)
class OpFit:
    """Coefficients fitted on the training points of one op kind, and their errors on the held-out ones."""

    coefficients: dict[str, float]
    predicted_s: np.ndarray
    """Fitted time of every point, held out or not, in input order."""
    held_out: np.ndarray
    """Boolean mask of the held-out points."""
    abs_pct_errors: np.ndarray
    """|fitted − measured| / measured of the held-out points."""

    @property
    def median_abs_pct_error(self) -> float:
        return float(np.median(self.abs_pct_errors)) if self.abs_pct_errors.size else 0.0

    @property
    def p90_abs_pct_error(self) -> float:
        return float(np.percentile(self.abs_pct_errors, 90)) if self.abs_pct_errors.size else 0.0


def feature_matrix(points: Sequence[Measured], terms: Sequence[str]) -> np.ndarray:
    """Build the design matrix: one row per point, one column per term (1, seqs, bytes or FLOPs)."""
    columns = {
        "fixed_s": np.ones(len(points)),
        "per_seq_s": np.array([p.num_seqs for p in points], dtype=float),
        "per_byte_s": np.array([p.bytes_moved for p in points], dtype=float),
        "per_flop_s": np.array([p.flops for p in points], dtype=float),
    }
    unknown = [term for term in terms if term not in columns]
    if unknown:
        raise ValueError(f"unknown fit terms {unknown}; choose from {COEFFICIENT_NAMES}")
    return np.column_stack([columns[term] for term in terms])


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve min ‖a·x − b‖² subject to x ≥ 0, exactly, for a few columns.

    The optimum is the unconstrained least-squares solution on some subset of the columns (the
    others at zero), so trying every subset and keeping the best feasible one is exact. With at
    most four terms that is 15 small solves. Columns are scaled to unit norm first, because bytes
    and FLOPs are ~1e9 while the constant column is 1.
    """
    num_columns = a.shape[1]
    if num_columns > 8:
        raise ValueError(f"subset enumeration is meant for a few columns, got {num_columns}")
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    scaled = a / norms

    best = np.zeros(num_columns)
    best_residual = float(np.sum(b**2))
    for size in range(1, num_columns + 1):
        for subset in itertools.combinations(range(num_columns), size):
            columns = list(subset)
            solution, *_ = np.linalg.lstsq(scaled[:, columns], b, rcond=None)
            if np.any(solution < 0):
                continue
            residual = float(np.sum((scaled[:, columns] @ solution - b) ** 2))
            if residual < best_residual:
                best_residual = residual
                best = np.zeros(num_columns)
                best[columns] = solution
    return best / norms


def fit_relative(points: Sequence[Measured], terms: Sequence[str]) -> dict[str, float]:
    """Non-negative coefficients that minimise the summed squared relative error over `points`."""
    if not points:
        raise ValueError("cannot fit an op kind without points")
    times = np.array([p.time_s for p in points], dtype=float)
    if np.any(times <= 0):
        raise ValueError("every measured time must be positive")
    a = feature_matrix(points, terms) / times[:, None]
    solution = nonnegative_least_squares(a, np.ones(len(points)))
    coefficients = dict.fromkeys(COEFFICIENT_NAMES, 0.0)
    coefficients.update({term: float(value) for term, value in zip(terms, solution)})
    return coefficients


def predict(points: Sequence[Measured], coefficients: dict[str, float]) -> np.ndarray:
    return feature_matrix(points, COEFFICIENT_NAMES) @ np.array([coefficients[t] for t in COEFFICIENT_NAMES])


def held_out_mask(num_points: int, every: int = HOLDOUT_EVERY) -> np.ndarray:
    """Hold out indices every−1, 2·every−1, ...; with fewer than `every` + 1 points nothing is held out."""
    mask = np.zeros(num_points, dtype=bool)
    if num_points > every:
        mask[every - 1 :: every] = True
    return mask


def fit_trimmed(points: Sequence[Measured], terms: Sequence[str], outlier_factor: float = 3.0) -> dict[str, float]:
    """Fit, drop gross outliers, and fit again on the rest.

    A point is an outlier when its relative error exceeds `outlier_factor` times the median
    relative error (and 5%). On a CPU shared with other processes a whole point can be measured
    several times too slow, and one such point would otherwise pull every coefficient.
    """
    coefficients = fit_relative(points, terms)
    times = np.array([p.time_s for p in points], dtype=float)
    errors = np.abs(predict(points, coefficients) - times) / times
    limit = max(outlier_factor * float(np.median(errors)), 0.05)
    inliers = [p for p, error in zip(points, errors) if error <= limit]
    if len(inliers) == len(points) or len(inliers) < len(terms) + 1:
        return coefficients
    return fit_relative(inliers, terms)


def fit_with_holdout(points: Sequence[Measured], terms: Sequence[str], every: int = HOLDOUT_EVERY) -> OpFit:
    """Fit on the training points (see `fit_trimmed`), then measure the relative error on the held-out ones.

    Held-out points are never trimmed, so an outlier among them shows in the reported error.
    """
    held_out = held_out_mask(len(points), every)
    training = [p for p, out in zip(points, held_out) if not out]
    coefficients = fit_trimmed(training, terms)
    predicted = predict(points, coefficients)
    times = np.array([p.time_s for p in points], dtype=float)
    errors = np.abs(predicted[held_out] - times[held_out]) / times[held_out]
    return OpFit(coefficients=coefficients, predicted_s=predicted, held_out=held_out, abs_pct_errors=errors)


def pooled_errors(fits: Sequence[OpFit]) -> tuple[float, float, int]:
    """Median and 90th percentile of the held-out relative errors of several fits, and their count."""
    errors = np.concatenate([fit.abs_pct_errors for fit in fits]) if fits else np.zeros(0)
    if errors.size == 0:
        return 0.0, 0.0, 0
    return float(np.median(errors)), float(np.percentile(errors, 90)), int(errors.size)
