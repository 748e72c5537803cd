"""Distributions: expected values worked out by hand, sample means, ranges and validation messages."""

import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from kvsim.workload.distributions import (
    Distribution,
    EmpiricalDistribution,
    ExponentialDistribution,
    FixedDistribution,
    LognormalDistribution,
    NormalDistribution,
    UniformDistribution,
)

ADAPTER = TypeAdapter(Distribution)
NUM_DRAWS = 200_000


def parse(value):
    return ADAPTER.validate_python(value)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_plain_number_is_fixed(rng):
    dist = parse(250)
    assert isinstance(dist, FixedDistribution)
    assert dist.mean() == 250
    assert set(dist.sample_tokens(rng, 10).tolist()) == {250}


def test_uniform_tokens_include_both_ends(rng):
    dist = parse({"dist": "uniform", "min": 3, "max": 5})
    assert isinstance(dist, UniformDistribution)
    draws = dist.sample_tokens(rng, 30_000)
    assert set(draws.tolist()) == {3, 4, 5}
    # Each of 3, 4, 5 has probability 1/3, so the mean is 4.
    assert dist.mean() == 4.0
    assert abs(draws.mean() - 4.0) < 0.02
    for value in (3, 4, 5):
        assert abs(np.mean(draws == value) - 1 / 3) < 0.01


def test_uniform_durations_are_continuous(rng):
    draws = parse({"dist": "uniform", "min": 1, "max": 2}).sample(rng, 1000)
    assert draws.min() >= 1
    assert draws.max() <= 2
    assert len(set(draws.tolist())) == 1000


def test_normal_clipped_at_zero_mean(rng):
    # E[max(X, 0)] for X ~ N(0, 1) is the standard normal density at 0: 1 / sqrt(2 pi).
    dist = parse({"dist": "normal", "mean": 0, "std": 1})
    assert isinstance(dist, NormalDistribution)
    assert dist.mean() == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-9)
    draws = dist.sample(rng, NUM_DRAWS)
    assert draws.min() == 0.0
    assert abs(draws.mean() - 1 / math.sqrt(2 * math.pi)) < 0.01


def test_normal_symmetric_clip_keeps_mean(rng):
    # Clipping N(100, 30) to [70, 130] moves equal mass to both bounds, so the mean stays 100.
    dist = parse({"dist": "normal", "mean": 100, "std": 30, "min": 70, "max": 130})
    assert dist.mean() == pytest.approx(100.0)
    draws = dist.sample(rng, NUM_DRAWS)
    assert draws.min() == 70
    assert draws.max() == 130
    # P(X < mean - std) = 0.1587 for a normal: that share sits exactly at the lower bound.
    assert abs(np.mean(draws == 70) - 0.1587) < 0.005


def test_lognormal_moments_to_log_parameters(rng):
    # mean 1 and std sqrt(e - 1) give sigma^2 = ln(1 + (e - 1)) = 1 and mu = ln(1) - 1/2.
    dist = parse({"dist": "lognormal", "mean": 1.0, "std": math.sqrt(math.e - 1)})
    assert isinstance(dist, LognormalDistribution)
    mu, sigma = dist.log_parameters()
    assert mu == pytest.approx(-0.5)
    assert sigma == pytest.approx(1.0)
    assert dist.mean() == pytest.approx(1.0)


def test_lognormal_mean_by_sampling(rng):
    dist = parse({"dist": "lognormal", "mean": 800, "std": 400})
    draws = dist.sample(rng, NUM_DRAWS)
    assert abs(draws.mean() - 800) < 8
    assert abs(draws.std() - 400) < 10


def test_lognormal_clipped_mean_matches_sampling(rng):
    dist = parse({"dist": "lognormal", "mu": 6, "sigma": 1, "min": 200, "max": 1000})
    draws = dist.sample(rng, NUM_DRAWS)
    assert draws.min() == 200
    assert draws.max() == 1000
    assert dist.mean() == pytest.approx(draws.mean(), rel=0.01)


def test_exponential_clipped_mean(rng):
    # E[min(X, 2)] for an exponential of mean 2 is 2 (1 - e^-1).
    dist = parse({"dist": "exponential", "mean": 2, "max": 2})
    assert isinstance(dist, ExponentialDistribution)
    assert dist.mean() == pytest.approx(2 * (1 - math.exp(-1)))
    assert abs(dist.sample(rng, NUM_DRAWS).mean() - 2 * (1 - math.exp(-1))) < 0.01


def test_exponential_unclipped_mean(rng):
    dist = parse({"dist": "exponential", "mean": 5})
    assert dist.mean() == pytest.approx(5.0)
    assert abs(dist.sample(rng, NUM_DRAWS).mean() - 5.0) < 0.05


def test_empirical_weights(rng):
    dist = parse({"dist": "empirical", "values": [1, 10], "weights": [3, 1]})
    assert isinstance(dist, EmpiricalDistribution)
    # 0.75 * 1 + 0.25 * 10
    assert dist.mean() == pytest.approx(3.25)
    draws = dist.sample_tokens(rng, 40_000)
    assert set(draws.tolist()) == {1, 10}
    assert abs(np.mean(draws == 1) - 0.75) < 0.01


def test_empirical_equal_weights(rng):
    dist = parse({"dist": "empirical", "values": [2, 4, 9]})
    assert dist.mean() == pytest.approx(5.0)


def test_sample_tokens_minimum(rng):
    dist = parse({"dist": "normal", "mean": 0, "std": 1})
    assert dist.sample_tokens(rng, 1000, min_tokens=1).min() == 1
    assert dist.sample_tokens(rng, 1000, min_tokens=0).min() == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"dist": "uniform", "min": 5, "max": 1}, r"min \(5.0\) must not exceed max \(1.0\)"),
        ({"dist": "normal", "mean": 5, "std": 0}, r"std"),
        ({"dist": "normal", "mean": 5, "std": 1, "min": -1}, r"min must be >= 0"),
        ({"dist": "lognormal", "mean": 5}, r"mean and std must be given together"),
        ({"dist": "lognormal", "mean": 5, "std": 1, "mu": 1, "sigma": 1}, r"not both"),
        ({"dist": "lognormal"}, r"missing parameters"),
        ({"dist": "exponential", "mean": 0}, r"mean"),
        ({"dist": "empirical", "values": [1, 2], "weights": [1]}, r"weights has 1 entries but values has 2"),
        ({"dist": "empirical", "values": [1, -2]}, r"values\[1\] must be >= 0"),
        ({"dist": "empirical", "values": [1], "weights": [0]}, r"weights must not all be 0"),
        ({"mean": 5}, r"needs 'dist'"),
        ({"dist": "poisson", "mean": 5}, r"does not match any of the expected tags"),
        ({"dist": "fixed", "value": 5, "typo": 1}, r"Extra inputs are not permitted"),
        (True, r"expected a number or a distribution mapping"),
        (-3, r"greater than or equal to 0"),
    ],
)
def test_invalid_distributions_are_rejected(value, message):
    with pytest.raises(ValidationError, match=message):
        parse(value)


def test_uniform_validates_by_name():
    assert UniformDistribution(dist="uniform", min=1, max=1).mean() == 1.0
