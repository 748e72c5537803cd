"""Distributions of token counts and durations, as written in the `workload:` section of a scenario.

A plain number means a fixed value. Otherwise a mapping selects the distribution by `dist`:

    tokens: 1000
    tokens: {dist: uniform, min: 100, max: 400}
    tokens: {dist: lognormal, mean: 800, std: 400, max: 8000}
    think_time_s: {dist: exponential, mean: 5}

Every quantity drawn here is a count or a duration, so every draw is clipped below at 0 (or at `min`
when it is set) and above at `max` when it is set. Clipping keeps the drawn value at the bound, it
does not redraw, and `mean()` is the mean of the clipped distribution.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

DISTRIBUTION_NAMES = ("fixed", "uniform", "normal", "lognormal", "exponential", "empirical")


def _std_normal_cdf(x: float) -> float:
    if x == math.inf:
        return 1.0
    if x == -math.inf:
        return 0.0
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _std_normal_pdf(x: float) -> float:
    if math.isinf(x):
        return 0.0
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


class _DistributionBase(BaseModel):
    """Shared sampling helpers. Subclasses define `sample` (real values) and `mean`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Draw `size` real values (float64), clipped to the distribution's bounds."""
        raise NotImplementedError

    def mean(self) -> float:
        """Expected value of `sample`, clipping included."""
        raise NotImplementedError

    def sample_tokens(self, rng: np.random.Generator, size: int, *, min_tokens: int = 1) -> np.ndarray:
        """Draw `size` token counts (int64): real draws rounded to the nearest integer, at least `min_tokens`."""
        values = np.rint(self.sample(rng, size)).astype(np.int64)
        return np.maximum(values, min_tokens)

    def sample_one(self, rng: np.random.Generator) -> float:
        return float(self.sample(rng, 1)[0])

    def sample_one_token_count(self, rng: np.random.Generator, *, min_tokens: int = 1) -> int:
        return int(self.sample_tokens(rng, 1, min_tokens=min_tokens)[0])

    def mean_tokens(self, *, min_tokens: int = 1) -> float:
        """Approximate mean of `sample_tokens`.

        NOTE: this ignores rounding, and it applies `min_tokens` to the mean rather than to each draw,
        so it is exact only when no draw falls below `min_tokens`.
        """
        return max(self.mean(), float(min_tokens))


def _check_bounds(low: float | None, high: float | None) -> None:
    if low is not None and low < 0:
        raise ValueError(f"min must be >= 0 (got {low}), because draws are token counts or durations")
    if low is not None and high is not None and low > high:
        raise ValueError(f"min ({low}) must not exceed max ({high})")


class FixedDistribution(_DistributionBase):
    """Always the same value. A plain number in the YAML means this distribution."""

    dist: Literal["fixed"] = "fixed"
    value: float = Field(ge=0, description="The value every draw returns.")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.value, dtype=np.float64)

    def mean(self) -> float:
        return self.value


class UniformDistribution(_DistributionBase):
    """Uniform over [min, max]. Token counts are integers drawn with both ends included."""

    dist: Literal["uniform"]
    min: float = Field(ge=0, description="Lower end, included.")
    max: float = Field(ge=0, description="Upper end, included.")

    @model_validator(mode="after")
    def _check(self) -> UniformDistribution:
        _check_bounds(self.min, self.max)
        return self

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.uniform(self.min, self.max, size)

    def sample_tokens(self, rng: np.random.Generator, size: int, *, min_tokens: int = 1) -> np.ndarray:
        low = int(round(self.min))
        high = int(round(self.max))
        return np.maximum(rng.integers(low, high + 1, size, dtype=np.int64), min_tokens)

    def mean(self) -> float:
        return 0.5 * (self.min + self.max)


class NormalDistribution(_DistributionBase):
    """Normal with mean and standard deviation, clipped to [min, max] (min defaults to 0)."""

    dist: Literal["normal"]
    mean_value: float = Field(alias="mean", description="Mean before clipping.")
    std: float = Field(gt=0, description="Standard deviation before clipping; must be > 0.")
    min: float | None = Field(None, description="Lower clip bound; 0 when not set.")
    max: float | None = Field(None, description="Upper clip bound; none when not set.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> NormalDistribution:
        _check_bounds(self.min, self.max)
        return self

    def _bounds(self) -> tuple[float, float]:
        low = 0.0 if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        return low, high

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        low, high = self._bounds()
        return np.clip(rng.normal(self.mean_value, self.std, size), low, high)

    def mean(self) -> float:
        # E[clip(X, a, b)] for X ~ N(mu, sigma): the two clipped tails sit at the bounds, and the
        # middle contributes mu * P(a < X < b) + sigma * (pdf(alpha) - pdf(beta)).
        low, high = self._bounds()
        mu, sigma = self.mean_value, self.std
        alpha = (low - mu) / sigma
        beta = (high - mu) / sigma if high != math.inf else math.inf
        below = _std_normal_cdf(alpha)
        above = 1.0 - _std_normal_cdf(beta)
        middle = mu * (_std_normal_cdf(beta) - below) + sigma * (_std_normal_pdf(alpha) - _std_normal_pdf(beta))
        return low * below + (high * above if above > 0 else 0.0) + middle


class LognormalDistribution(_DistributionBase):
    """Log-normal, given either by the mean and std of the values or by `mu` and `sigma` of their log.

    Clipped to [min, max]. Request lengths in production traces are heavy-tailed, and a log-normal
    is the usual first fit for them.
    """

    dist: Literal["lognormal"]
    mean_value: float | None = Field(None, alias="mean", gt=0, description="Mean of the values (not of their log).")
    std: float | None = Field(None, gt=0, description="Standard deviation of the values (not of their log).")
    mu: float | None = Field(None, description="Mean of the log of the values.")
    sigma: float | None = Field(None, gt=0, description="Standard deviation of the log of the values.")
    min: float | None = Field(None, description="Lower clip bound; 0 when not set.")
    max: float | None = Field(None, description="Upper clip bound; none when not set.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> LognormalDistribution:
        by_moments = self.mean_value is not None or self.std is not None
        by_log = self.mu is not None or self.sigma is not None
        if by_moments and by_log:
            raise ValueError("give either mean and std, or mu and sigma, not both")
        if by_moments and (self.mean_value is None or self.std is None):
            raise ValueError("mean and std must be given together")
        if by_log and (self.mu is None or self.sigma is None):
            raise ValueError("mu and sigma must be given together")
        if not by_moments and not by_log:
            raise ValueError("missing parameters: give mean and std, or mu and sigma")
        _check_bounds(self.min, self.max)
        return self

    def log_parameters(self) -> tuple[float, float]:
        """Return (mu, sigma) of the underlying normal."""
        if self.mu is not None and self.sigma is not None:
            return self.mu, self.sigma
        assert self.mean_value is not None and self.std is not None
        # Moment matching: if log X ~ N(mu, s^2) then E[X] = exp(mu + s^2/2) and
        # Var[X] = (exp(s^2) - 1) E[X]^2.
        sigma_squared = math.log1p((self.std / self.mean_value) ** 2)
        return math.log(self.mean_value) - 0.5 * sigma_squared, math.sqrt(sigma_squared)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        mu, sigma = self.log_parameters()
        low = 0.0 if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        return np.clip(rng.lognormal(mu, sigma, size), low, high)

    def mean(self) -> float:
        mu, sigma = self.log_parameters()
        low = 0.0 if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        log_low = math.log(low) if low > 0 else -math.inf
        log_high = math.log(high) if high != math.inf else math.inf

        def z(log_x: float, shift: float) -> float:
            return (log_x - mu - shift) / sigma if math.isfinite(log_x) else log_x

        # Partial expectation of a log-normal: E[X; a <= X <= b] = exp(mu + sigma^2/2) *
        # (Phi((ln b - mu - sigma^2)/sigma) - Phi((ln a - mu - sigma^2)/sigma)).
        middle = math.exp(mu + 0.5 * sigma**2) * (
            _std_normal_cdf(z(log_high, sigma**2)) - _std_normal_cdf(z(log_low, sigma**2))
        )
        below = _std_normal_cdf(z(log_low, 0.0))
        above = 1.0 - _std_normal_cdf(z(log_high, 0.0))
        return low * below + (high * above if above > 0 else 0.0) + middle


class ExponentialDistribution(_DistributionBase):
    """Exponential with the given mean, optionally clipped to [min, max]."""

    dist: Literal["exponential"]
    mean_value: float = Field(alias="mean", gt=0, description="Mean before clipping; must be > 0.")
    min: float | None = Field(None, description="Lower clip bound; 0 when not set.")
    max: float | None = Field(None, description="Upper clip bound; none when not set.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> ExponentialDistribution:
        _check_bounds(self.min, self.max)
        return self

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        low = 0.0 if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        return np.clip(rng.exponential(self.mean_value, size), low, high)

    def mean(self) -> float:
        # E[clip(X, a, b)] = a + integral from a to b of P(X > x) dx = a + m (exp(-a/m) - exp(-b/m)).
        low = 0.0 if self.min is None else self.min
        scale = self.mean_value
        tail_high = 0.0 if self.max is None else math.exp(-self.max / scale)
        return low + scale * (math.exp(-low / scale) - tail_high)


class EmpiricalDistribution(_DistributionBase):
    """One of the listed values, with optional weights (equal weights when omitted)."""

    dist: Literal["empirical"]
    values: list[float] = Field(min_length=1, description="The values to draw from; each >= 0.")
    weights: list[float] | None = Field(None, description="Relative weight of each value; same length as values.")

    @model_validator(mode="after")
    def _check(self) -> EmpiricalDistribution:
        for index, value in enumerate(self.values):
            if value < 0:
                raise ValueError(f"values[{index}] must be >= 0 (got {value})")
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but values has {len(self.values)}; "
                    "give one weight per value"
                )
            for index, weight in enumerate(self.weights):
                if weight < 0:
                    raise ValueError(f"weights[{index}] must be >= 0 (got {weight})")
            if sum(self.weights) <= 0:
                raise ValueError("weights must not all be 0")
        return self

    def _probabilities(self) -> np.ndarray | None:
        if self.weights is None:
            return None
        weights = np.asarray(self.weights, dtype=np.float64)
        return weights / weights.sum()

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        values = np.asarray(self.values, dtype=np.float64)
        return rng.choice(values, size=size, p=self._probabilities())

    def mean(self) -> float:
        probabilities = self._probabilities()
        if probabilities is None:
            return float(np.mean(self.values))
        return float(np.dot(self.values, probabilities))


def _plain_number_to_fixed(value: Any) -> Any:
    """Turn a plain number into a fixed distribution, and explain a mapping without `dist`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a distribution mapping, got {value!r}")
    if isinstance(value, (int, float)):
        return {"dist": "fixed", "value": value}
    if isinstance(value, dict) and "dist" not in value:
        raise ValueError(
            f"a distribution mapping needs 'dist' (one of {', '.join(DISTRIBUTION_NAMES)}); "
            f"got keys {sorted(value)}. Write a plain number for a fixed value."
        )
    return value


AnyDistribution = Union[
    FixedDistribution,
    UniformDistribution,
    NormalDistribution,
    LognormalDistribution,
    ExponentialDistribution,
    EmpiricalDistribution,
]

Distribution = Annotated[
    Annotated[AnyDistribution, Field(discriminator="dist")],
    BeforeValidator(_plain_number_to_fixed),
]
"""A field type: a plain number (fixed) or a mapping selected by `dist`."""


def fixed(value: float) -> FixedDistribution:
    """Return the distribution that always draws `value`."""
    return FixedDistribution(value=value)
