"""Paired comparisons of two models scored on the same examples: a bootstrap interval and McNemar's test.

`paired_interval(a, b, mode=...)` is the interval of the mean improvement of
`a` over `b` (positive: `a` is better, in the metric's direction), from the
per-example differences resampled together, so the example-to-example
variation both models share cancels out. Up to `NORMAL_ABOVE` examples it is
the percentile bootstrap (seeded, vectorised, resampled in chunks of at most
`CHUNK_ELEMENTS` indices); above, the normal approximation of the mean
(mean +- z * sd / sqrt(n)), which the bootstrap converges to at that size.

`mcnemar(a_correct, b_correct)` is the two-sided p-value of McNemar's test
for 0/1 outcomes: exact (binomial) below 25 discordant pairs, else the
chi-square with continuity correction.

Example:
    >>> from prefect_tensorflow.tasks.promotion.paired import mcnemar, paired_interval
    >>> interval = paired_interval([1, 1, 1, 0] * 10, [1, 0, 1, 0] * 10, mode="max", confidence=0.95, samples=500)
    >>> interval.estimate, interval.low > 0, interval.method
    (0.25, True, 'paired bootstrap')
    >>> round(mcnemar([1, 1, 1, 0] * 10, [1, 0, 1, 0] * 10), 4)
    0.002
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..metric_order import Mode

NORMAL_ABOVE = 20_000  # examples; above this the interval is the normal approximation (bootstrap ~1 s at 20k)
CHUNK_ELEMENTS = 4_000_000  # resampled indices held at once
EXACT_BELOW = 25  # discordant pairs; McNemar is exact (binomial) below this

Values = Union[Sequence[float], np.ndarray]


class Interval(BaseModel):
    """A two-sided interval of the mean improvement (positive: better), at `confidence`."""

    model_config = ConfigDict(frozen=True)

    estimate: float
    low: float
    high: float
    confidence: float
    method: Literal["paired bootstrap", "normal approximation"]
    n: int
    samples: int


def improvements(a: Values, b: Values, mode: Mode) -> np.ndarray:
    """Per-example improvement of `a` over `b`: `a - b` for "max", `b - a` for "min".

    Raises:
        ValueError: different lengths, no examples, or a bad mode.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values: expected two 1-D arrays of one length, received shapes {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired values: expected at least one example, received none")
    if mode == "max":
        return x - y
    if mode == "min":
        return y - x
    raise ValueError(f"mode: expected 'min' or 'max', received {mode!r}")


def paired_interval(a: Values, b: Values, *, mode: Mode, confidence: float, samples: int, seed: int = 0) -> Interval:
    """The interval of the mean improvement of `a` over `b` on the same examples (see the module docstring).

    Args:
        a, b: per-example values of one metric, same examples, same order (a: the challenger).
        mode: "max" if higher values are better, "min" if lower are.
        confidence: e.g. 0.95 for the 2.5% and 97.5% percentiles.
        samples: bootstrap resamples.
        seed: the resampling seed (the same inputs give the same interval).

    Example:
        >>> paired_interval([0.2, 0.3, 0.1], [0.2, 0.3, 0.1], mode="min", confidence=0.9, samples=200)
        Interval(estimate=0.0, low=0.0, high=0.0, confidence=0.9, method='paired bootstrap', n=3, samples=200)
    """
    d = improvements(a, b, mode)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), received {confidence!r}")
    n, estimate = d.size, float(d.mean())
    tail = (1 - confidence) / 2
    if not np.isfinite(d).all():
        nan = float("nan")
        return Interval(estimate=nan, low=nan, high=nan, confidence=confidence, method="paired bootstrap", n=n, samples=0)
    if n > NORMAL_ABOVE:
        z = NormalDist().inv_cdf(1 - tail)
        half = z * float(d.std(ddof=1)) / math.sqrt(n)
        return Interval(
            estimate=estimate,
            low=estimate - half,
            high=estimate + half,
            confidence=confidence,
            method="normal approximation",
            n=n,
            samples=0,
        )
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, samples, rows):
        count = min(rows, samples - start)
        means[start : start + count] = d[rng.integers(0, n, size=(count, n))].mean(axis=1)
    low, high = np.quantile(means, [tail, 1 - tail])
    low, high = float(low), float(high)
    if float(d.min()) == float(d.max()):  # identical differences: exactly that value (no rounding in the means)
        low = high = estimate
    return Interval(estimate=estimate, low=low, high=high, confidence=confidence, method="paired bootstrap", n=n, samples=samples)


def mcnemar(a_correct: Values, b_correct: Values) -> float:
    """Two-sided p-value of McNemar's test that `a` and `b` are right equally often on the same examples.

    Args:
        a_correct, b_correct: per-example 1 (right) or 0 (wrong), same examples, same order.

    Example:
        >>> mcnemar([1, 1, 0], [1, 1, 0]), round(mcnemar([1] * 6, [0] * 6), 4)
        (1.0, 0.0312)
    """
    x, y = np.asarray(a_correct, dtype=np.float64), np.asarray(b_correct, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired outcomes: expected two 1-D arrays of one length, received shapes {x.shape} and {y.shape}")
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("paired outcomes: McNemar's test expects 0/1 values (right or wrong per example)")
    only_a = int(((x == 1) & (y == 0)).sum())
    only_b = int(((x == 0) & (y == 1)).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    if discordant < EXACT_BELOW:
        k = min(only_a, only_b)
        tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2.0**discordant
        return min(1.0, 2.0 * tail)
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    return math.erfc(math.sqrt(statistic / 2.0))
